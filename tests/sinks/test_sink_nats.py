"""The NATS JetStream sink: pure helpers (always run) and against real nats-server processes."""
from __future__ import annotations

import re
import sys
import threading
import time

import httpx
import msgspec
import pytest
import trio
from hypothesis import given, settings, strategies as st
from jetstream_reader import in_asyncio, stream_info, stream_messages, stream_raw
from prometheus_client.parser import text_string_to_metric_families

import gridgate
from gridgate.config import Config, ConfigError, HTTPConfig, NATSConfig, SinkConfig
from gridgate.ingest.records import Record
from gridgate.sinks.base import Sink
from gridgate.sinks.nats import (
    READINGS_HEADER,
    NATSSink,
    SinkOpenError,
    SinkWriteError,
    SubjectTemplate,
    batch_msg_id,
    decode_record,
    decode_records,
    encode_record,
    encode_records,
    msg_id,
    sanitize_token,
    subject_covers,
)
from inprocess import make_config
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


_token_text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=140)


@settings(max_examples=300, deadline=None)
@given(template=st.sampled_from([TEMPLATE, "gw.{protocol}.{site}.{zone}.x", "flat", "x.{device_id}",
                                 "t.{region}.$lit-1:a.{region}"]),
       device_id=_token_text, protocol=_token_text,
       tags=st.dictionaries(st.sampled_from(["region", "site", "zone", "other"]), _token_text, max_size=4))
def test_compiled_subject_render_agrees_with_the_walk_over_the_parts(template, device_id, protocol, tags):
    """Each template's render is generated code (one expression): it gives what the
    plain walk over the template's parts gives, for any device id, protocol and tags."""
    t = SubjectTemplate(template)
    r = Record(device_id=device_id, ts_ns=1, received_ns=1, protocol=protocol, fields={"v": 1.0}, tags=tags)
    assert t.render(r) == t.render_parts(r)


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
                   {"subject": "x.{a}b"}, {"write_timeout_s": 0}, {"duplicate_window_s": -1}, {"max_inflight": 0},
                   {"readings_per_message": 0}, {"readings_per_message": 10_001}):
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
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread names in /proc are Linux's")
async def test_the_loop_thread_has_a_kernel_name_of_its_own(server):
    """The sink's asyncio loop thread is named for the kernel (15 bytes of
    gridgate-nats-<stream>), so /proc (and bench sinks) can tell its CPU from the Trio thread's."""
    async with NATSSink(servers=[server.url], stream=STREAM, subject=TEMPLATE) as sink:
        assert _kernel_thread_name(sink._thread.native_id) == f"gridgate-nats-{STREAM}"[:15]
        assert not _kernel_thread_name(threading.get_native_id()).startswith("gridgate-nats")  # only that thread


def _kernel_thread_name(tid: int) -> str:
    with open(f"/proc/self/task/{tid}/comm") as f:
        return f.read().strip()


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


def tap_sends(sink, see):
    """Wrap the client's write buffer (asyncio side: the sink hands it each
    fill's publishes at once) so ``see`` is shown every command first."""
    nc = sink._nc
    send = nc._send_command

    async def tapped(cmd, *args, **kwargs):
        see(cmd)
        return await send(cmd, *args, **kwargs)
    nc._send_command = tapped


def watch_window(sink):
    """Record the most slots of the window ever taken at once."""
    peak = [0]

    def see(_cmd):
        peak[0] = max(peak[0], sink.max_inflight - sink._free_slots)
    tap_sends(sink, see)
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


def watch_reply_subjects(sink):
    """Record the reply subject of every publish the sink hands its client."""
    replies: list[bytes] = []
    tap_sends(sink, lambda cmd: replies.extend(re.findall(rb"HPUB \S+ (\S+) \d+ \d+\r\n", cmd)))
    return replies


@needs_nats
async def test_publishes_reuse_the_windows_reply_subjects(server):
    # One reply subject per slot of the window, each reused once its ack is in
    # (nats-server then routes the acks from its subject cache), not one per publish.
    batch = records(500)
    async with NATSSink(servers=[server.url], stream=STREAM, subject=TEMPLATE, max_inflight=8) as sink:
        replies = watch_reply_subjects(sink)
        await sink.write(batch)
        await sink.write(batch)                    # every one a duplicate
        assert (sink.published, sink.publishes, sink.duplicates, sink.retries) == (1000, 1000, 500, 0)
        assert len(replies) == 1000
        assert set(replies) == {b"%s.%d" % (sink._inbox.encode(), i) for i in range(8)}
        assert sink._slot_owner == {} and sink._free_slots == 8 and sink._slot_seq == 8
    msgs = await in_thread(stream_messages, [server.url])
    assert [mid for _, mid, _ in msgs] == [msg_id(r) for r in batch]


@needs_nats
async def test_a_publish_with_a_late_ack_retires_its_slot(server):
    # The plain acks of the first reads are held back 100 ms on the sink's
    # loop, far past ack_timeout_s (20 ms): those publishes are retried on new
    # slots, and their late acks, on the retired slots, still count for their
    # own message and never for another. The write ends with every record
    # stored once, the window whole, and no slot left owned.
    batch = records(2000)
    async with NATSSink(servers=[server.url], stream=STREAM, subject=TEMPLATE, max_inflight=32,
                        ack_timeout_s=0.02, write_timeout_s=60) as sink:
        replies = watch_reply_subjects(sink)
        nc, held = sink._nc, [0]
        on_plain = nc.on_plain

        def late(slots):
            if held[0] < 3:
                held[0] += 1
                sink._loop.call_later(0.1, on_plain, slots)
            else:
                on_plain(slots)
        nc.on_plain = late
        await sink.write(batch)
        assert held[0] == 3
        assert sink.published == 2000 and sink.retries > 0 and sink.publishes == 2000 + sink.retries
        # slots were retired, new numbers took their place (and were published on)
        inbox = sink._inbox.encode()
        assert sink._slot_seq > 32 and b"%s.32" % inbox in replies
        assert set(replies) <= {b"%s.%d" % (inbox, i) for i in range(sink._slot_seq)}
        assert sink._slot_owner == {} and sink._free_slots == 32
    msgs = await in_thread(stream_messages, [server.url])
    assert sorted(mid for _, mid, _ in msgs) == sorted(msg_id(r) for r in batch)


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


# -- the batched format (readings_per_message > 1) ------------------------------------

BATCH_TEMPLATE = "telemetry.{region}"


def by_subject(batch: list[Record], template: str = BATCH_TEMPLATE) -> dict[str, list[Record]]:
    """The records of each rendered subject, in their order (dicts keep first-seen order)."""
    render, out = SubjectTemplate(template).render, {}
    for r in batch:
        out.setdefault(render(r), []).append(r)
    return out


def test_batched_messages_group_by_subject_keep_order_and_hold_at_most_n():
    sink = NATSSink(subject=BATCH_TEMPLATE, readings_per_message=3)
    batch = records(22)                  # four regions in turn: 6, 6, 5 and 5 readings
    items, readings = sink._batch_messages(batch)
    assert [s for s, _, _ in items] == [s for s in ("telemetry.eu-west", "telemetry.ap_east", "telemetry.us_east",
                                                    "telemetry._") for _ in range(2)]
    assert readings == [3, 3, 3, 3, 3, 2, 3, 2]
    bodies = [msgspec.msgpack.decode(body, type=list[Record]) for _, body, _ in items]   # as a consumer decodes
    assert [len(b) for b in bodies] == readings
    assert bodies[0] == [batch[0], batch[4], batch[8]]
    for subject, group in by_subject(batch).items():
        assert [r for (s, _, _), body in zip(items, bodies, strict=True) if s == subject for r in body] == group
    mids = [mid for _, _, mid in items]
    assert mids == [batch_msg_id(b) for b in bodies] and len(set(mids)) == len(mids)
    assert all(re.fullmatch(r"readings:\d+:[0-9a-f]{32}", mid) for mid in mids)
    # the same readings again, received later over another protocol: the same messages, the same ids
    replay = [msgspec.structs.replace(r, received_ns=r.received_ns + 7, protocol="http") for r in batch]
    assert [mid for _, _, mid in sink._batch_messages(replay)[0]] == mids
    # grouped differently (the first reading left out): both eu-west messages change, the rest do not
    shifted = {mid for _, _, mid in sink._batch_messages(batch[1:])[0]}
    assert set(mids) - shifted == set(mids[:2]) and len(shifted - set(mids)) == 2


def test_a_batched_message_too_big_for_the_server_is_halved_until_it_fits():
    sink = NATSSink(subject=BATCH_TEMPLATE, readings_per_message=100)
    batch = records(40)                  # ten readings per region
    sink._max_body = len(encode_records(batch[:3])) + 10     # room for about three readings
    items, readings = sink._batch_messages(batch)
    assert all(len(body) <= sink._max_body for _, body, _ in items)
    assert readings[:4] == [2, 3, 2, 3] and sum(readings) == 40      # 10 -> 5 + 5 -> (2 + 3) + (2 + 3)
    assert [r for _, body, _ in items for r in decode_records(body)] == [
        r for group in by_subject(batch).values() for r in group]
    assert [mid for _, _, mid in sink._batch_messages(batch)[0]] == [mid for _, _, mid in items]   # cut alike


def test_readings_per_message_config_key_and_bounds():
    assert NATSConfig().readings_per_message == 1
    env = {"ENVIRONMENT": "t", "SERVICE_NAME": "s"}
    assert Config.load(env={**env, "GRIDGATE_NATS_READINGS_PER_MESSAGE": "500"}).nats.readings_per_message == 500
    for bad in ("0", "10001"):
        with pytest.raises(ConfigError, match="readings_per_message"):
            Config.load(env={**env, "GRIDGATE_NATS_READINGS_PER_MESSAGE": bad})


def consume(urls: list[str], count: int) -> list[tuple[str, dict[str, str], list[Record]]]:
    """A durable pull consumer on the whole stream, as a batch-taking consumer
    would run it: fetch, decode each body as a list of records, ack."""
    async def fn(js):
        sub = await js.pull_subscribe("telemetry.>", durable="batch-reader", stream=STREAM)
        out: list[tuple[str, dict[str, str], list[Record]]] = []
        for _ in range(50):              # bounded: each fetch waits at most 2 s
            if len(out) >= count:
                break
            for m in await sub.fetch(count - len(out), timeout=2):
                out.append((m.subject, dict(m.headers or {}), msgspec.msgpack.decode(m.data, type=list[Record])))
                await m.ack_sync()               # confirmed, so consumer_info below sees it
        info = await sub.consumer_info()
        assert info.num_pending == 0 and info.num_ack_pending == 0       # nothing more, every one acked
        return out
    return in_asyncio(urls, fn)


@needs_nats
async def test_batched_format_round_trip_through_a_jetstream_consumer(server):
    batch = records(1000)                # 250 readings per region
    async with NATSSink(servers=[server.url], stream=STREAM, subject=BATCH_TEMPLATE, readings_per_message=100,
                        write_timeout_s=60) as sink:
        await sink.write(batch)
        # 4 regions x (100 + 100 + 50): one publish per message, every reading counted
        assert (sink.published, sink.messages, sink.publishes, sink.retries, sink.duplicates) == (1000, 12, 12, 0, 0)
        assert sink.inflight == 0
    got = await in_thread(consume, [server.url], 12)
    assert [(subject, len(body)) for subject, _, body in got] == [
        (subject, n) for subject in ("telemetry.eu-west", "telemetry.ap_east", "telemetry.us_east", "telemetry._")
        for n in (100, 100, 50)]
    for subject, headers, body in got:
        assert headers[READINGS_HEADER] == str(len(body))
        assert headers["Nats-Msg-Id"] == batch_msg_id(body)
        assert {SubjectTemplate(BATCH_TEMPLATE).render(r) for r in body} == {subject}   # the subject rule
    groups = by_subject(batch)
    for subject, group in groups.items():
        assert [r for s, _, body in got if s == subject for r in body] == group        # exact records, in order
    assert (await in_thread(stream_info, [server.url])).config.subjects == ["telemetry.*"]


@needs_nats
async def test_a_replayed_batch_is_deduplicated_and_one_grouped_differently_is_not(server):
    batch = records(600)
    async with NATSSink(servers=[server.url], stream=STREAM, subject=BATCH_TEMPLATE, readings_per_message=50,
                        write_timeout_s=60) as sink:
        await sink.write(batch)
        assert (sink.published, sink.messages, sink.duplicates) == (600, 12, 0)
        # the replay of a failed write, or a device resending: the same messages, dropped by JetStream
        await sink.write([msgspec.structs.replace(r, received_ns=r.received_ns + 5, protocol="http")
                          for r in batch])
        assert (sink.published, sink.messages, sink.duplicates) == (1200, 24, 600)
        assert (await in_thread(stream_info, [server.url])).state.messages == 12
        # the same readings cut elsewhere make new messages and are stored again
        # (at-least-once; the module docstring says so, consumers de-duplicate by reading)
        await sink.write(batch[:100])
        assert sink.duplicates == 600
    raw = await in_thread(stream_raw, [server.url])
    assert len(raw) == 16
    readings = [r for _, _, data in raw for r in decode_records(data)]
    assert len(readings) == 700 and len({msg_id(r) for r in readings}) == 600      # by reading: 600 distinct


@needs_nats
async def test_a_batched_write_fails_when_one_message_is_not_acked(server):
    # The stream refuses messages over 4 KiB (JetStream answers the publish
    # with an error, which no retry fixes). One region's message is over it,
    # the others are not: the write must fail as a whole, and count nothing.
    async def create(js):
        await js.add_stream(name=STREAM, subjects=["telemetry.>"], max_msg_size=4096)
    await in_thread(in_asyncio, [server.url], create)
    small = records(12)                                     # three readings per region
    big = [msgspec.structs.replace(r, tags={"region": "big"}) for r in records(60, start=12)]
    async with NATSSink(servers=[server.url], stream=STREAM, subject=BATCH_TEMPLATE, readings_per_message=100,
                        write_timeout_s=5) as sink:
        assert len(encode_records(big)) > 4096 > len(encode_records(small[:3]))
        with trio.fail_after(10):
            with pytest.raises(SinkWriteError, match=r"4 of 5 messages acked \(12 of 72 records\), 1 not") as exc:
                await sink.write(small + big)
        assert "telemetry.big" in str(exc.value)
        assert (sink.published, sink.messages) == (0, 0)
        await sink.write(small)                             # what was acked de-duplicates on the replay
        assert (sink.published, sink.duplicates) == (12, 12)
    assert (await in_thread(stream_info, [server.url])).state.messages == 4


@needs_nats
async def test_a_batched_write_to_a_killed_server_fails_then_its_replay_lands_once(server):
    # Real time (a real server), as in the unbatched test above: the outcome is checked, not the seconds.
    first, failed = records(400), records(400, start=400)
    sink = await NATSSink.open(servers=[server.url], stream=STREAM, subject=BATCH_TEMPLATE,
                               readings_per_message=100, write_timeout_s=2.0, ack_timeout_s=0.5,
                               reconnect_wait_s=0.1)
    try:
        await sink.write(first)
        await in_thread(server.kill)
        with trio.fail_after(15):
            with pytest.raises(SinkWriteError, match=r"0 of 4 messages acked \(0 of 400 records\)"):
                await sink.write(failed)
        assert sink.retries >= 1                            # the same msg-ids sent again before giving up
        await in_thread(server.restart)
        with trio.fail_after(30):
            await sink.write(failed)                        # gridgate replays the failed batch
        assert (sink.published, sink.messages) == (800, 8)
    finally:
        await sink.aclose()
    raw = await in_thread(stream_raw, [server.url])
    assert len(raw) == 8                                    # a buffered retry of the failed write de-duplicated
    assert sorted(msg_id(r) for _, _, data in raw for r in decode_records(data)) == sorted(
        msg_id(r) for r in first + failed)


def scrape(text: str) -> dict[str, float]:
    return {sample.name: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name.startswith("gridgate_nats_")}


@needs_nats
async def test_nats_counters_are_exported_to_metrics(server, nursery, tmp_path):
    # A whole gateway: [nats] readings_per_message reaches the sink, and /metrics reads its counters.
    config = make_config(tmp_path, http=HTTPConfig(listen="127.0.0.1:0"),
                         sink=SinkConfig(kind="nats", write_timeout_s=10),
                         nats=NATSConfig(servers=[server.url], subject=BATCH_TEMPLATE, readings_per_message=50))
    gateway = await nursery.start(gridgate.serve, config)
    host, port = gateway.addresses["http"]
    body = b"\n".join(b'{"device_id": "m-%d", "temperature": 21, "location": "%s/x", "timestamp_ms": %d}'
                      % (i, (b"eu", b"us")[i % 2], 1_764_000_000_000 + i) for i in range(80))
    async with httpx.AsyncClient(base_url=f"http://{host}:{port}", timeout=10) as client:
        with trio.fail_after(20):
            resp = await client.post("/v1/telemetry", content=body, headers={"Content-Type": "application/x-ndjson"})
            assert resp.status_code == 202, resp.text
            sink = gateway.forwarder.sink
            assert isinstance(sink, NATSSink) and sink.readings_per_message == 50
            values = scrape((await client.get("/metrics")).text)
    # 80 readings in one or more batches of the pipeline, each grouped by the two regions
    assert values["gridgate_nats_published_readings_total"] == sink.published == 80
    assert values["gridgate_nats_messages_total"] == sink.messages
    assert 2 <= sink.messages < 80
    assert values["gridgate_nats_publishes_total"] == sink.publishes == sink.messages
    assert values["gridgate_nats_retries_total"] == 0
    assert values["gridgate_nats_duplicate_readings_total"] == 0
    assert values["gridgate_nats_publishes_in_flight"] == 0
    gateway.stop()


# -- the ack fast path: nats-py's parser, subclassed -------------------------------------

def test_the_parser_hands_acks_over_in_order_and_leaves_the_rest_to_nats_py():
    """Acks at the head of each read go to on_acks in one list; what follows anything
    else (a message of another subscription, a PING, a message cut by the read) goes
    through nats-py's own parser, whose messages of the ack sid still reach on_acks."""
    import asyncio

    from gridgate.sinks.nats import _Client

    got: list[list[tuple[bytes, bytes, bytes | None]]] = []
    pongs: list[bool] = []

    async def feed(chunks):
        nc = _Client()
        nc.take_acks(7, got.append)

        async def pong():
            pongs.append(True)
        nc._process_ping = pong          # no connection to answer a PING on
        for chunk in chunks:
            await nc._ps.parse(chunk)
        return nc

    ack = b'{"stream":"S", "seq":%d}'
    msg = b"MSG _INBOX.x.1.%d.1 7  %d\r\n%s\r\n"
    frames = [msg % (i, len(ack % i), ack % i) for i in range(4)]
    status = b"HMSG _INBOX.x.1.9.1 7  16 16\r\nNATS/1.0 503\r\n\r\n\r\n"
    other = b"MSG other.subject 3  2\r\nhi\r\n"
    wire = frames[0] + frames[1] + other + frames[2] + b"PING\r\n" + status + frames[3]
    cut = len(frames[0]) + 10                 # the second ack cut mid-line
    nc = asyncio.run(feed([wire[:cut], wire[cut:]]))
    flat = [a for batch in got for a in batch]
    assert [s for s, _, _ in flat] == [b"_INBOX.x.1.%d.1" % i for i in (0, 1, 2, 9, 3)]
    assert [d for _, d, _ in flat] == [ack % 0, ack % 1, ack % 2, b"", ack % 3]
    assert flat[3][2] == b"NATS/1.0 503\r\n\r\n" and all(h is None for i, (_, _, h) in enumerate(flat) if i != 3)
    assert len(got[0]) == 1 and pongs == [True]   # one per read at the head; the cut one came with the next
    assert not nc._ps.buf


def test_an_ack_cut_by_a_read_waits_whole_for_the_next_read():
    """A read that ends inside an ack's line or body leaves that ack in the buffer:
    the next read hands it over with the acks after it in one list (had nats-py's
    parser taken its line, it would have parsed that whole next read itself)."""
    import asyncio

    from gridgate.sinks.nats import _Client

    ack = b'{"stream":"S", "seq":%d}'
    frames = [b"MSG _INBOX.x.2.%d.1 7  %d\r\n%s\r\n" % (i, len(ack % i), ack % i) for i in range(4)]
    wire = b"".join(frames)
    for cut in (len(frames[0]) + 10, len(frames[0]) + len(frames[1]) - 5, len(frames[0]) + len(frames[1]) - 1):
        got: list[list[tuple[bytes, bytes, bytes | None]]] = []

        async def feed(chunks, got=got):
            nc = _Client()
            nc.take_acks(7, got.append)
            for chunk in chunks:
                await nc._ps.parse(chunk)
            return nc
        nc = asyncio.run(feed([wire[:cut], wire[cut:]]))
        assert [[d for _, d, _ in batch] for batch in got] == [[ack % 0], [ack % i for i in (1, 2, 3)]], cut
        assert not nc._ps.buf


def test_plain_acks_go_over_as_their_slot_the_rest_as_before():
    """With the plain-ack pattern set, each ``{"stream":"<ours>", "seq":N}`` ack of the
    sink's reply prefix goes to on_plain as its slot's digits; an ack in any other form (a
    duplicate, another stream's, a size on the line that is not its body's, another
    prefix, a subject of more tokens) goes to on_acks whole, and an ack cut by the read
    waits for the next read."""
    import asyncio

    from gridgate.sinks.nats import _Client

    plain: list[list[tuple[bytes, ...]]] = []
    other: list[list[tuple[bytes, bytes, bytes | None]]] = []

    async def feed(chunks):
        nc = _Client()
        nc.take_acks(7, other.append, plain=(b"_INBOX.x.", "S", plain.append))
        for chunk in chunks:
            await nc._ps.parse(chunk)
        return nc

    def msg(subject: bytes, body: bytes, size: int | None = None) -> bytes:
        return b"MSG %b 7  %d\r\n%b\r\n" % (subject, len(body) if size is None else size, body)

    ok = b'{"stream":"S", "seq":%d}'
    dup = b'{"stream":"S", "seq":3, "duplicate": true}'
    theirs = b'{"stream":"T", "seq":4}'
    wire = [msg(b"_INBOX.x.0", ok % 1), msg(b"_INBOX.x.511", ok % 2), msg(b"_INBOX.x.2", dup),
            msg(b"_INBOX.x.3", ok % 55), msg(b"_INBOX.x.4", theirs),
            # the size on the line says more than the plain body: read as the line says (7 bytes on)
            msg(b"_INBOX.x.5", ok % 6 + b"\r\nabcde", len(ok % 6) + 7),
            msg(b"_INBOX.y.6", ok % 7), msg(b"_INBOX.x.7.1", ok % 9), msg(b"_INBOX.x.513", ok % 8)]
    data = b"".join(wire)
    cut = len(data) - len(wire[-1]) + 15            # the last one cut in its line
    nc = asyncio.run(feed([data[:cut], data[cut:]]))
    assert [p for batch in plain for p in batch] == [b"0", b"511", b"3", b"513"]
    assert [[s for s, _, _ in batch] for batch in other] == [
        [b"_INBOX.x.2", b"_INBOX.x.4", b"_INBOX.x.5", b"_INBOX.y.6", b"_INBOX.x.7.1"]]
    assert [d for batch in other for _, d, _ in batch] == [dup, theirs, ok % 6 + b"\r\nabcde", ok % 7, ok % 9]
    assert len(plain) == 2 and plain[1] == [b"513"]      # the cut one came with the next read
    assert not nc._ps.buf
