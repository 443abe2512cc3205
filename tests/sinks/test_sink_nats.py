"""The NATS JetStream sink: pure helpers (always run) and against real nats-server processes."""
from __future__ import annotations

import re
import threading
import time

import msgspec
import pytest
import trio
from jetstream_reader import in_asyncio, stream_info, stream_messages

from gridgate.ingest.records import Record
from gridgate.sinks.base import Sink
from gridgate.sinks.nats import (
    NATSSink,
    SinkOpenError,
    SinkWriteError,
    SubjectTemplate,
    decode_record,
    encode_record,
    msg_id,
    sanitize_token,
    subject_covers,
)
from natsproc import NatsCluster, NatsServer, free_port

needs_nats = pytest.mark.usefixtures("nats_server_binary")

STREAM = "TELEMETRY"
TEMPLATE = "telemetry.{region}.{device_id}"


def rec(device_id: str = "meter-0001", ts_ns: int = 1_732_406_400_123_000_000, *, received_ns: int = 1,
        protocol: str = "mqtt", fields: dict | None = None, tags: dict | None = None) -> Record:
    return Record(device_id=device_id, ts_ns=ts_ns, received_ns=received_ns, protocol=protocol,
                  fields={"temperature_mc": 23500, "battery_mv": 3700} if fields is None else fields,
                  tags={"region": "shanghai", "site": "factory-a"} if tags is None else tags)


def records(n: int, *, start: int = 0, devices: int = 50) -> list[Record]:
    """``n`` distinct readings (distinct msg-ids) over ``devices`` devices and four regions."""
    return [rec(f"meter-{i % devices:04d}", 1_700_000_000_000_000_000 + i * 1_000_000,
                received_ns=1_700_000_000_000_000_000 + i,
                fields={"temperature_mc": 20000 + i % 5000, "battery_mv": 3000 + i % 700},
                tags={"region": ("eu-west", "ap.east", "us east", "")[i % 4], "site": f"s{i % 3}"})
            for i in range(start, start + n)]


# -- pure helpers (no server) -----------------------------------------------------------

@pytest.mark.parametrize("raw, token", [
    ("meter-0001", "meter-0001"),
    ("meter.0001", "meter_0001"),
    ("a b\tc", "a_b_c"),
    ("*", "_"),
    (">", "_"),
    ("x.*.>", "x____"),
    ("", "_"),
    ("zürich", "z_rich"),
    ("dev:01_A", "dev:01_A"),
    ("a\r\nb", "a__b"),
    ("x" * 300, "x" * 128),
])
def test_sanitize_token(raw, token):
    assert sanitize_token(raw) == token


def test_subject_template_renders_sanitized_tokens():
    t = SubjectTemplate(TEMPLATE)
    assert t.placeholders == ("region", "device_id")
    assert t.wildcard == "telemetry.*.*"
    assert t.render(rec()) == "telemetry.shanghai.meter-0001"
    assert t.render(rec("meter.7", tags={"region": "eu west"})) == "telemetry.eu_west.meter_7"
    assert t.render(rec("a:b", tags={"region": "*>"})) == "telemetry.__.a:b"
    assert t.render(rec(tags={})) == "telemetry._.meter-0001"          # missing tag
    t2 = SubjectTemplate("gw.{protocol}.{site}.{zone}.x")
    assert t2.render(rec(protocol="mqtt-ws")) == "gw.mqtt-ws.factory-a._.x"
    assert t2.wildcard == "gw.*.*.*.x"
    for r in records(200):
        tokens = t.render(r).split(".")
        assert len(tokens) == 3 and all(tok and not set(tok) & set(" \t.*>") for tok in tokens)


@pytest.mark.parametrize("bad", [
    "", "telemetry.dev-{device_id}", "telemetry..{device_id}", "tele metry.{device_id}",
    "telemetry.*.{device_id}", "telemetry.>", "telemetry.{device_id", "telemetry.{1x}", ".x",
])
def test_subject_template_rejects(bad):
    with pytest.raises(ValueError):
        SubjectTemplate(bad)


@pytest.mark.parametrize("pattern, subject, covered", [
    ("telemetry.>", "telemetry.*.*", True),
    ("telemetry.*.*", "telemetry.*.*", True),
    ("telemetry.*.*", "telemetry.a.b", True),
    (">", "telemetry.*.*", True),
    ("telemetry.a.*", "telemetry.*.*", False),
    ("telemetry.*", "telemetry.*.*", False),
    ("telemetry.*.*.*", "telemetry.*.*", False),
    ("telemetry.*.*", "telemetry.>", False),
    ("other.>", "telemetry.*.*", False),
    ("telemetry.>", "telemetry", False),
])
def test_subject_covers(pattern, subject, covered):
    assert subject_covers(pattern, subject) is covered


def test_msg_id_is_deterministic_and_content_addressed():
    base = rec()
    mid = msg_id(base)
    assert mid == msg_id(rec())
    device, ts, digest = mid.rsplit(":", 2)
    assert device == "meter-0001" and ts == str(base.ts_ns) and len(digest) == 24
    # a replay: received later, over another protocol, dict order different -> the same id
    assert msg_id(rec(received_ns=999, protocol="http")) == mid
    assert msg_id(rec(fields={"battery_mv": 3700, "temperature_mc": 23500},
                      tags={"site": "factory-a", "region": "shanghai"})) == mid
    # different readings -> different ids
    others = [rec("meter-0002"), rec(ts_ns=base.ts_ns + 1), rec(fields={"temperature_mc": 23501, "battery_mv": 3700}),
              rec(fields={"temperature_mc": 23500.0, "battery_mv": 3700}), rec(tags={"region": "shanghai"}),
              rec(tags={"region": "shanghai", "site": "factory-b"})]
    ids = {msg_id(r) for r in others}
    assert mid not in ids and len(ids) == len(others)
    # device ids that sanitize alike still get different ids (the hash covers the raw id)
    assert msg_id(rec("a.b")) != msg_id(rec("a_b"))
    # usable as a header value
    assert all(not set(msg_id(r)) & set(" \t\r\n") for r in records(100) + [rec("a\r\nb")])
    assert len({msg_id(r) for r in records(5000)}) == 5000


def test_payload_is_msgpack_of_the_record():
    r = rec(fields={"temperature_mc": -40000, "humidity": 55.5})
    data = encode_record(r)
    assert decode_record(data) == r
    assert msgspec.msgpack.decode(data) == {"device_id": r.device_id, "ts_ns": r.ts_ns, "received_ns": r.received_ns,
                                            "protocol": "mqtt", "fields": {"temperature_mc": -40000, "humidity": 55.5},
                                            "tags": r.tags}


def test_constructor_validates_config():
    sink = NATSSink(servers="nats://127.0.0.1:4222")
    assert sink.servers == ["nats://127.0.0.1:4222"] and sink.stream_subjects == ["telemetry.*.*"]
    assert isinstance(sink, Sink)
    for kwargs in ({"servers": []}, {"stream": "a.b"}, {"stream": "a b"}, {"replicas": 0}, {"replicas": 7},
                   {"subject": "x.{a}b"}, {"write_timeout_s": 0}, {"duplicate_window_s": -1}, {"max_inflight": 0}):
        with pytest.raises(ValueError):
            NATSSink(**kwargs)


async def test_write_before_open_and_empty_batch():
    sink = NATSSink()
    await sink.write([])                       # nothing to do, even unopened
    with pytest.raises(SinkWriteError, match="not open"):
        await sink.write([rec()])
    await sink.aclose()
    with pytest.raises(SinkOpenError, match="closed"):
        await sink.connect()


async def test_open_without_a_server_fails_clearly():
    # Real time (a real, refused socket); the outcome is what is checked: the
    # error names the servers and the connect_timeout_s it gave up after.
    port = free_port()                         # nothing listens there
    with pytest.raises(SinkOpenError, match=rf"cannot connect to NATS at nats://127\.0\.0\.1:{port} within 1s"):
        await NATSSink.open(servers=[f"nats://127.0.0.1:{port}"], connect_timeout_s=1.0, reconnect_wait_s=0.1)


async def in_thread(fn, *args):
    """A blocking reader (jetstream_reader) on a worker thread."""
    return await trio.to_thread.run_sync(fn, *args)


@pytest.fixture
def server(tmp_path):
    s = NatsServer(tmp_path).start()
    yield s
    s.stop()


# -- against one real server ----------------------------------------------------------

@needs_nats
async def test_10000_records_land_as_10000_messages(server):
    batch = records(10_000)
    # The default 2 s ack timeout: with a bounded window of publishes in
    # flight (max_inflight), each ack comes long before its publish's timeout
    # even on a busy machine (with all 10,000 in flight at once, the acks
    # queued past it and every publish was retried). write_timeout_s is
    # generous: landing is the point here, not speed.
    sink = await NATSSink.open(servers=[server.url], stream=STREAM, subject=TEMPLATE, write_timeout_s=120)
    await sink.write(batch)
    assert sink.published == 10_000 and sink.duplicates == 0
    assert sink.publishes == 10_000                # each record published once: no retry
    assert sink._free_slots == sink.max_inflight   # every slot of the window given back
    info = await in_thread(stream_info, [server.url])
    assert info.state.messages == 10_000
    assert info.config.subjects == ["telemetry.*.*"]
    assert info.config.duplicate_window == pytest.approx(120.0)
    assert info.config.num_replicas == 1
    thread = sink._thread
    await sink.aclose()
    assert not thread.is_alive()
    with pytest.raises(SinkWriteError, match="not open"):
        await sink.write(batch[:1])
    await sink.aclose()                        # idempotent
    # what landed is exactly what was written, each on its sanitized subject with its msg-id
    msgs = await in_thread(stream_messages, [server.url], STREAM, 300)
    assert len(msgs) == 300
    for (subject, mid, r), expected in zip(msgs, batch[:300], strict=True):
        assert r == expected and mid == msg_id(expected)
        assert subject == SubjectTemplate(TEMPLATE).render(expected)
    assert {s.split(".")[1] for s, _, _ in msgs} == {"eu-west", "ap_east", "us_east", "_"}


@needs_nats
async def test_same_batch_twice_is_deduplicated(server):
    batch = records(2000)
    async with NATSSink(servers=[server.url], stream=STREAM, subject=TEMPLATE) as sink:
        await sink.write(batch)
        await sink.write(batch)
        # a device replaying readings: received later, over another protocol
        await sink.write([msgspec.structs.replace(r, received_ns=r.received_ns + 5, protocol="http")
                          for r in batch[:500]])
        assert sink.published == 4500 and sink.duplicates == 2500
        await sink.write(records(10, start=2000))
    # a second gateway (new connection) sees the existing stream and dedups too
    async with NATSSink(servers=[server.url], stream=STREAM, subject=TEMPLATE) as sink:
        await sink.write(batch[:100])
        assert sink.duplicates == 100
    assert (await in_thread(stream_info, [server.url])).state.messages == 2010


@needs_nats
async def test_existing_stream_must_cover_the_subject(server):
    async def create(js):
        await js.add_stream(name=STREAM, subjects=["other.>"])
    await in_thread(in_asyncio, [server.url], create)

    with pytest.raises(SinkOpenError, match=r"do not cover \['telemetry\.\*\.\*'\]"):
        await NATSSink.open(servers=[server.url], stream=STREAM, subject=TEMPLATE, connect_timeout_s=3)
    # another stream name whose subjects would overlap the existing stream's: refused by JetStream
    with pytest.raises(SinkOpenError, match="cannot create JetStream stream 'T2'"):
        await NATSSink.open(servers=[server.url], stream="T2", subject="other.{device_id}", connect_timeout_s=3)
    # an existing stream with a wider subject is used as it is
    async with NATSSink(servers=[server.url], stream=STREAM, subject="other.x.{device_id}") as sink:
        await sink.write(records(5))
    assert (await in_thread(stream_info, [server.url])).state.messages == 5


@needs_nats
async def test_write_while_server_killed_fails_then_recovers_after_restart(server):
    # Real time (a real server). What is checked is the outcome and the order
    # of events, not how many seconds they took.
    first, failed, later = records(300), records(300, start=300), records(300, start=600)
    sink = await NATSSink.open(servers=[server.url], stream=STREAM, subject=TEMPLATE,
                               write_timeout_s=2.0, ack_timeout_s=0.5, reconnect_wait_s=0.1)
    try:
        await sink.write(first)
        await in_thread(server.kill)

        # no ack: retried with the same msg-id (ack_timeout_s 0.5 < write_timeout_s 2)
        # until write_timeout_s, then the whole batch counts as not written
        with pytest.raises(SinkWriteError, match=r"0 of 300 records acked.*write_timeout_s 2\b") as exc:
            await sink.write(failed)
        assert "stream 'TELEMETRY'" in str(exc.value)
        attempts = re.search(r"after (\d+) attempt", str(exc.value))
        assert attempts is not None and int(attempts.group(1)) >= 2
        assert (sink.published, sink.duplicates) == (300, 0)

        # a Trio cancel interrupts a write that is waiting on a dead server:
        # the scope's deadline (0.3 s) is long before the write's own (2 s),
        # whose SinkWriteError would otherwise come out of the scope
        with trio.move_on_after(0.3) as scope:
            await sink.write(failed)
        assert scope.cancelled_caught
        await wait_for_free_window(sink)           # the cancelled write gave its slots back

        await in_thread(server.restart)
        # gridgate retries the failed batch, then goes on; the sink rides the reconnect
        await sink.write(failed)
        await sink.write(later)
        assert sink.published == 900
    finally:
        await sink.aclose()
    msgs = await in_thread(stream_messages, [server.url])
    assert len(msgs) == 900                        # buffered retries de-duplicated
    assert {mid for _, mid, _ in msgs} == {msg_id(r) for r in first + failed + later}


def hog_loop(loop, stop):
    """Keep an asyncio loop blocked 8 ms of every ~10 until ``stop`` is set."""
    def tick():
        if not stop.is_set():
            time.sleep(0.008)
            loop.call_later(0.002, tick)
    loop.call_soon_threadsafe(tick)


async def wait_for_free_window(sink, timeout=5.0):
    """Every slot of the sink's window back (a cancelled write releases them on the asyncio thread)."""
    with trio.fail_after(timeout):
        while sink._free_slots != sink.max_inflight:
            await trio.sleep(0.01)


def watch_window(sink):
    """Wrap the sink's publish (asyncio side) to record the most slots ever taken at once."""
    nc, peak = sink._nc, [0]
    publish = nc.publish

    async def counting(*args, **kwargs):
        peak[0] = max(peak[0], sink.max_inflight - sink._free_slots)
        return await publish(*args, **kwargs)
    nc.publish = counting
    return peak


@needs_nats
async def test_write_publishes_each_record_once_and_waits_for_every_ack(server):
    batch = records(3000)
    async with NATSSink(servers=[server.url], stream=STREAM, subject=TEMPLATE, max_inflight=256) as sink:
        peak = watch_window(sink)
        await sink.write(batch)
        # write returned: every record acked, each published once, none a duplicate
        assert (sink.published, sink.publishes, sink.duplicates) == (3000, 3000, 0)
        assert 1 < peak[0] <= 256                  # a window, not one at a time, and never wider
        assert sink._free_slots == 256
        info = await in_thread(stream_info, [server.url])
        assert info.state.messages == 3000
        # the same batch again: 3000 publishes more, every one a duplicate, nothing stored
        await sink.write(batch)
        assert (sink.published, sink.publishes, sink.duplicates) == (6000, 6000, 3000)
    msgs = await in_thread(stream_messages, [server.url])
    assert [mid for _, mid, _ in msgs] == [msg_id(r) for r in batch]   # in order, each once


@needs_nats
async def test_large_write_under_a_small_window(server):
    batch = records(20_000)
    async with NATSSink(servers=[server.url], stream=STREAM, subject=TEMPLATE, max_inflight=4,
                        write_timeout_s=120) as sink:
        peak = watch_window(sink)
        # two writes at once share the sink's window
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sink.write, batch[:15_000])
            nursery.start_soon(sink.write, batch[15_000:])
        assert peak[0] <= 4
        assert (sink.published, sink.publishes, sink.duplicates) == (20_000, 20_000, 0)
        assert sink._free_slots == 4
    assert (await in_thread(stream_info, [server.url])).state.messages == 20_000


@needs_nats
async def test_a_cancelled_write_hands_its_window_to_a_waiting_one(server):
    # Real time (a real server). The first write takes the whole window and
    # gets no ack (the server is down); the second waits for a slot. When the
    # first is cancelled its slots must go to the second at once, not when
    # the second's own deadline (30 s) comes.
    sink = await NATSSink.open(servers=[server.url], stream=STREAM, subject=TEMPLATE, max_inflight=8,
                               write_timeout_s=30, ack_timeout_s=30, reconnect_wait_s=0.1)
    try:
        await sink.write(records(10))
        await in_thread(server.kill)
        with trio.fail_after(5):
            while sink._nc.is_connected:           # the client has seen the server go
                await trio.sleep(0.01)
        second: list[str] = []

        async def first():
            with trio.move_on_after(1.0):
                await sink.write(records(100, start=10))

        async def write_second():
            await sink.write(records(100, start=110))
            second.append("done")

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(first)
                await trio.sleep(0.3)
                nursery.start_soon(write_second)   # no free slot: it waits
                await trio.sleep(1.2)              # the first is cancelled by now
                assert sink._free_slots == 0       # ... and the second took its slots
                await in_thread(server.restart)
        assert second == ["done"] and sink.published == 110
        await wait_for_free_window(sink)
    finally:
        await sink.aclose()
    stored = {mid for _, mid, _ in await in_thread(stream_messages, [server.url])}
    assert {msg_id(r) for r in records(10) + records(100, start=110)} <= stored


@needs_nats
async def test_acks_do_not_time_out_while_the_loop_is_busy(server):
    # The stall a colleague saw: under CPU load, with every publish of a big
    # batch in flight, acks queued behind each other past the ack timeout and
    # every publish timed out and was retried ("0 of 10000 records acked").
    # Here the sink's own asyncio loop is kept busy most of the time (a task
    # that blocks it 8 ms of every ~10): with a window, each publish's timeout
    # counts from its own send and its ack comes well within it.
    batch = records(10_000)
    async with NATSSink(servers=[server.url], stream=STREAM, subject=TEMPLATE, ack_timeout_s=0.5,
                        write_timeout_s=120) as sink:
        stop = threading.Event()
        hog_loop(sink._loop, stop)
        try:
            await sink.write(batch)
        finally:
            stop.set()
        assert (sink.published, sink.duplicates) == (10_000, 0)
        assert sink.publishes == 10_000            # not one ack timed out
    assert (await in_thread(stream_info, [server.url])).state.messages == 10_000


@needs_nats
async def test_server_killed_mid_write_then_replay_loses_nothing(server):
    # Real time (a real server): a big write under a small window, the server
    # SIGKILLed while it is under way. The write raises (store-and-forward
    # keeps the batch pending), and the replay after the restart lands every
    # record exactly once: what was acked before the kill de-duplicates.
    batch = records(20_000)
    sink = await NATSSink.open(servers=[server.url], stream=STREAM, subject=TEMPLATE, max_inflight=64,
                               write_timeout_s=3.0, ack_timeout_s=0.5, reconnect_wait_s=0.1)
    try:
        failed: list[BaseException] = []

        async def write():
            try:
                await sink.write(batch)
            except SinkWriteError as e:
                failed.append(e)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(write)
            with trio.fail_after(30):
                while sink.publishes < 2000:
                    await trio.sleep(0.001)
            await in_thread(server.kill)
        assert len(failed) == 1, "the write must raise when the server dies under it"
        m = re.search(r"(\d+) of 20000 records acked", str(failed[0]))
        assert m is not None and 0 < int(m.group(1)) < 20_000, str(failed[0])
        assert sink.published == 0                 # a failed write counts nothing
        await wait_for_free_window(sink)

        await in_thread(server.restart)
        await sink.write(batch)                    # the replay
        assert sink.published == 20_000
        assert sink.duplicates >= int(m.group(1))  # at least what was acked before the kill
    finally:
        await sink.aclose()
    msgs = await in_thread(stream_messages, [server.url])
    assert len(msgs) == 20_000
    assert sorted(mid for _, mid, _ in msgs) == sorted(msg_id(r) for r in batch)


# -- against a three-node cluster -------------------------------------------------------

@pytest.fixture
def cluster(tmp_path):
    c = NatsCluster(tmp_path).start()
    yield c
    c.stop()


@needs_nats
async def test_cluster_r3_survives_sigkill_of_the_stream_leader(cluster):
    batches = [records(400, start=i * 400) for i in range(5)]
    opts = dict(stream=STREAM, subject=TEMPLATE, replicas=3, write_timeout_s=20, ack_timeout_s=1.0,
                reconnect_wait_s=0.1)
    async with NATSSink(servers=cluster.urls, **opts) as sink:
        await sink.write(batches[0])
        info = await in_thread(stream_info, cluster.urls)
        assert info.config.num_replicas == 3 and info.state.messages == 400
        leader = cluster.node(info.cluster.leader)
        # a second gateway knows only the leader's address: it must fail over to
        # the nodes the server advertised, while the stream elects a new leader
        async with NATSSink(servers=[leader.url], **opts) as seeded:
            await seeded.write(batches[1])
            assert seeded._nc.connected_url.port == leader.port
            await in_thread(cluster.kill, leader.name)   # the worst node to lose: the stream's writes go through it
            # each write waits out the leader election within its write_timeout_s
            await sink.write(batches[2])
            await seeded.write(batches[3])             # reconnected to a surviving node
            await sink.write(batches[4])
            assert seeded._nc.connected_url.port != leader.port
    live = [n.url for n in cluster.nodes if n.name != leader.name]
    info = await in_thread(stream_info, live)
    assert info.cluster.leader not in (None, leader.name) and info.state.messages == 2000
    acked = {msg_id(r) for b in batches for r in b}
    stored = [mid for _, mid, _ in await in_thread(stream_messages, live)]
    assert len(stored) == 2000 and set(stored) == acked      # nothing acked is missing, nothing twice
