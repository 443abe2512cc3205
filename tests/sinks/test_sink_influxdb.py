"""InfluxDB 1.x sink: line-protocol encoding (always) and a real influxd (when installed)."""
from __future__ import annotations

import enum
import gzip
import itertools
import random
import socket

import httpx
import pytest
import trio

from gridgate.ingest.records import Record
from gridgate.sinks.influxdb import (
    InfluxDBEncodeError,
    InfluxDBHTTPError,
    InfluxDBSink,
    InfluxDBUnavailableError,
    SinkWriteError,
)
from gridgate.sinks.line_protocol import (
    MAX_TIMESTAMP_NS,
    MIN_TIMESTAMP_NS,
    LineProtocolError,
    encode,
    encode_lines,
    escape_key,
    escape_measurement,
    escape_tag_value,
    format_field_value,
)
from influxproc import InfluxProcess

needs_influxd = pytest.mark.usefixtures("influxd_binary")

TS0 = 1_732_406_400_123_000_000


def rec(device_id: str = "meter-0001", ts_ns: int = TS0, fields=None, tags=None) -> Record:
    return Record(device_id=device_id, ts_ns=ts_ns, received_ns=ts_ns + 5, protocol="mqtt",
                  fields={"battery_mv": 3700} if fields is None else fields, tags={} if tags is None else tags)


# ---------------------------------------------------------------------------
# Escaping
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name, expected", [
    ("telemetry", "telemetry"),
    ("a,b", r"a\,b"),
    ("a b", r"a\ b"),
    (" a, b ", r"\ a\,\ b\ "),
    ("a=b", "a=b"),                 # an equals sign needs no escape in a measurement
    ('a"b', 'a"b'),
    ("ünï€😀", "ünï€😀"),
])
def test_escape_measurement(name, expected):
    assert escape_measurement(name) == expected


@pytest.mark.parametrize("name", ["", "#comment", "a\\b", "a\nb", "a\rb"])
def test_measurement_refused(name):
    with pytest.raises(LineProtocolError):
        escape_measurement(name)


KEY_AND_VALUE_CASES = [
    ("plain", "plain"),
    ("a,b", r"a\,b"),
    ("a=b", r"a\=b"),
    ("a b", r"a\ b"),
    (",= ", r"\,\=\ "),
    ("  ", r"\ \ "),
    ('a"b"', 'a"b"'),               # quotes are literal outside string field values
    ("a\\b", "a\\b"),               # a backslash before an ordinary character is literal
    ("a\\\\b", "a\\\\b"),
    ("\\start", "\\start"),
    ("tab\there", "tab\there"),
    ("ünï€😀", "ünï€😀"),
    ("meter-0001.a:b_c", "meter-0001.a:b_c"),
]


@pytest.mark.parametrize("raw, expected", KEY_AND_VALUE_CASES)
def test_escape_tag_value(raw, expected):
    assert escape_tag_value(raw) == expected


@pytest.mark.parametrize("raw, expected", KEY_AND_VALUE_CASES)
def test_escape_key(raw, expected):
    assert escape_key(raw) == expected


# Unrepresentable in InfluxDB 1.x (its parser takes "\<delimiter>" as escaped
# whatever comes before the backslash), and line breaks.
UNREPRESENTABLE = ["end\\", "end\\\\", "a\\,b", "a\\=b", "a\\ b", "\\", "a\nb", "a\rb", "\n"]


@pytest.mark.parametrize("raw", UNREPRESENTABLE)
def test_unrepresentable_tag_values_and_keys_refused(raw):
    with pytest.raises(LineProtocolError):
        escape_tag_value(raw)
    with pytest.raises(LineProtocolError):
        escape_key(raw)


@pytest.mark.parametrize("key", ["", "time"])
def test_reserved_or_empty_keys_refused(key):
    with pytest.raises(LineProtocolError):
        escape_key(key)


# ---------------------------------------------------------------------------
# Field values
# ---------------------------------------------------------------------------

class Level(enum.IntEnum):
    HIGH = 3


@pytest.mark.parametrize("value, expected", [
    (0, "0i"), (123, "123i"), (-5, "-5i"),
    (2**63 - 1, "9223372036854775807i"), (-2**63, "-9223372036854775808i"),
    (Level.HIGH, "3i"),
    (1.0, "1.0"), (0.1, "0.1"), (-2.5, "-2.5"), (1e16, "1e+16"), (1e-07, "1e-07"),
    (5e-324, "5e-324"), (1.7976931348623157e308, "1.7976931348623157e+308"), (-0.0, "-0.0"),
    (True, "true"), (False, "false"),
    ("", '""'), ("plain", '"plain"'), ('say "hi"', r'"say \"hi\""'), ("back\\slash", r'"back\\slash"'),
    ('\\"', r'"\\\""'), ("two\nlines", '"two\nlines"'), ("a,b=c d", '"a,b=c d"'), ("ü😀", '"ü😀"'),
])
def test_format_field_value(value, expected):
    assert format_field_value(value) == expected


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), 2**63, -2**63 - 1,
                                   None, b"bytes", [1], {"a": 1}])
def test_field_value_refused(value):
    with pytest.raises(LineProtocolError):
        format_field_value(value)


def test_float_repr_round_trips():
    r = random.Random(7)
    for _ in range(2000):
        v = r.choice([r.random(), r.uniform(-1e300, 1e300), r.gauss(0, 1) * 10 ** r.randint(-300, 300)])
        assert float(format_field_value(v)) == v


# ---------------------------------------------------------------------------
# Whole lines
# ---------------------------------------------------------------------------

def test_encode_line_exact():
    record = rec(fields={"temperature_mc": 23500, "humidity": 41.5, "ok": True, "note": 'a "b"'},
                 tags={"zone": "z 1", "region": "shanghai", "alpha": "x,y", "empty": "", "site": "a=b"})
    assert encode([record]) == (
        b'telemetry,alpha=x\\,y,device_id=meter-0001,region=shanghai,site=a\\=b,zone=z\\ 1 '
        b'temperature_mc=23500i,humidity=41.5,ok=true,note="a \\"b\\"" 1732406400123000000\n')


def test_encode_several_records_and_measurement():
    records = [rec("d1", TS0, {"v": 1}), rec("d2", TS0 + 1, {"v": 2.5}, {"k": "w"})]
    assert encode(records, measurement="my meter,s") == (
        b"my\\ meter\\,s,device_id=d1 v=1i 1732406400123000000\n"
        b"my\\ meter\\,s,device_id=d2,k=w v=2.5 1732406400123000001\n")
    assert encode_lines(records) == ["telemetry,device_id=d1 v=1i 1732406400123000000",
                                     "telemetry,device_id=d2,k=w v=2.5 1732406400123000001"]


def test_encode_edge_values():
    assert encode([]) == b""
    assert encode([rec(tags={"a": "1"}, ts_ns=MIN_TIMESTAMP_NS)]) == \
        b"telemetry,a=1,device_id=meter-0001 battery_mv=3700i -9223372036854775806\n"
    assert encode([rec(device_id="d x", ts_ns=MAX_TIMESTAMP_NS, fields={"k=ey, x": 0})]) == \
        b"telemetry,device_id=d\\ x k\\=ey\\,\\ x=0i 9223372036854775806\n"
    # a tag whose value is empty is left out, even if it is the only one
    assert encode([rec(tags={"zone": ""})]) == b"telemetry,device_id=meter-0001 battery_mv=3700i 1732406400123000000\n"


@pytest.mark.parametrize("bad", [
    dict(ts_ns=MAX_TIMESTAMP_NS + 1), dict(ts_ns=MIN_TIMESTAMP_NS - 1), dict(ts_ns=True), dict(ts_ns=1.5),
    dict(fields={}), dict(fields={"time": 1}), dict(fields={"x": float("nan")}), dict(fields={"": 1}),
    dict(tags={"device_id": "other"}), dict(tags={"time": "x"}), dict(tags={"k": 5}), dict(tags={"k": "v\\"}),
    dict(tags={"k": "a\nb"}), dict(device_id=""), dict(device_id="end\\"), dict(fields={"s": "\ud800"}),
])
def test_encode_refuses_with_index(bad):
    good = rec()
    with pytest.raises(LineProtocolError) as info:
        encode([good, good, rec(**bad), good])
    assert info.value.index == 2
    assert isinstance(info.value, ValueError)


# ---------------------------------------------------------------------------
# The sink without a server: request shape, chunking, errors
# ---------------------------------------------------------------------------

def test_sink_constructor_validates():
    for kwargs in [dict(url="ftp://x"), dict(url="nohost"), dict(database=""), dict(measurement="#x"),
                   dict(timeout_s=0), dict(max_lines=0)]:
        with pytest.raises(ValueError):
            InfluxDBSink(**kwargs)


def _mock_sink(handler, **kwargs) -> InfluxDBSink:
    return InfluxDBSink("http://influx.invalid:8086/prefix/", "tele db", transport=httpx.MockTransport(handler),
                        **kwargs)


async def test_sink_posts_gzip_chunks():
    requests: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(204)

    records = [rec(f"d{i}", TS0 + i, {"v": i}) for i in range(7)]
    async with _mock_sink(handler, max_lines=3) as sink:
        await sink.write(records)
        await sink.write([])
    assert len(requests) == 3
    bodies = []
    for request in requests:
        assert request.method == "POST"
        assert request.url.path == "/prefix/write"
        assert dict(request.url.params) == {"db": "tele db", "precision": "ns"}
        assert request.headers["Content-Encoding"] == "gzip"
        bodies.append(gzip.decompress(request.content))
    assert [b.count(b"\n") for b in bodies] == [3, 3, 1]
    assert b"".join(bodies) == encode(records)


async def test_sink_error_answers():
    answers = iter([
        httpx.Response(400, json={"error": "partial write: field type conflict dropped=1"}),
        httpx.Response(404, json={"error": "database not found: \"tele db\""}),
        httpx.Response(500, text="boom"),
    ])
    async with _mock_sink(lambda request: next(answers)) as sink:
        with pytest.raises(InfluxDBHTTPError, match="field type conflict") as info:
            await sink.write([rec()])
        assert (info.value.status, info.value.retryable) == (400, False)
        with pytest.raises(InfluxDBHTTPError, match="database not found") as info:
            await sink.write([rec()])
        assert (info.value.status, info.value.retryable) == (404, True)
        with pytest.raises(InfluxDBHTTPError, match="HTTP 500: boom"):
            await sink.write([rec()])


async def test_sink_encode_error_sends_nothing():
    requests = []

    def handler(request):
        requests.append(request)
        return httpx.Response(204)

    async with _mock_sink(handler, max_lines=2) as sink:
        with pytest.raises(InfluxDBEncodeError) as info:
            await sink.write([rec(), rec(), rec(), rec(fields={"x": float("inf")})])
        assert info.value.index == 3
        assert not info.value.retryable
        assert isinstance(info.value, SinkWriteError)
    assert requests == []


async def test_sink_deadline_is_timeout_s_exactly(autojump_clock):
    # A server that takes the request and never answers, in memory: the
    # sink's own deadline ends the write, at timeout_s to the nanosecond.
    async def never_answers(request: httpx.Request) -> httpx.Response:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    async with _mock_sink(never_answers, timeout_s=0.5) as sink:
        start = trio.current_time()
        with pytest.raises(InfluxDBUnavailableError, match="timed out after 0.5 s") as info:
            await sink.write([rec()])
        assert trio.current_time() == start + 0.5
        assert info.value.retryable


async def test_sink_times_out_on_a_silent_server():
    # A listening socket that never accepts: the connection is made by the
    # kernel, the request is sent, and no answer ever comes. Real time (real
    # sockets): the outcome is checked; the exact deadline is the test above.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        async with InfluxDBSink(f"http://127.0.0.1:{port}", timeout_s=0.5) as sink:
            with trio.fail_after(30):          # a hang guard, should the deadline not work
                with pytest.raises(InfluxDBUnavailableError, match="timed out after 0.5 s") as info:
                    await sink.write([rec()])
        assert info.value.retryable


async def test_sink_connection_refused():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]       # bound but not listening: refused
        with pytest.raises(InfluxDBUnavailableError, match="ConnectError"):
            await InfluxDBSink.open(f"http://127.0.0.1:{port}", timeout_s=2)
        async with InfluxDBSink(f"http://127.0.0.1:{port}", timeout_s=2) as sink:
            with pytest.raises(InfluxDBUnavailableError, match="ConnectError") as info:
                await sink.write([rec()])
            assert info.value.retryable


# ---------------------------------------------------------------------------
# Against a real influxd
# ---------------------------------------------------------------------------

_db_counter = itertools.count()


@pytest.fixture(scope="module")
def influx(tmp_path_factory):
    proc = InfluxProcess(tmp_path_factory.mktemp("influxd"))
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture
def db() -> str:
    return f"gridgate test-{next(_db_counter)}"    # a space: the name is quoted and URL-encoded


async def _rows(influx: InfluxProcess, q: str, db: str) -> list[dict]:
    """``influx.rows`` on a worker thread (it blocks on urllib)."""
    return await trio.to_thread.run_sync(influx.rows, q, db)


async def _count(influx: InfluxProcess, db: str, field: str = "v", measurement: str = "telemetry") -> int:
    rows = await _rows(influx, f'SELECT COUNT("{field}") FROM "{measurement}"', db)
    return rows[0]["count"] if rows else 0


TRICKY_TAG_VALUES = [
    "a b", "a,b", "a=b", " lead", "trail ", "=start", ",start", "a\\b", "a\\\\b", "\\start", '"quoted"',
    'a"b', "ünï€😀", "tab\there", "x==y,,z  w", "=", ",", " ", "#hash", "'single'",
]


def _random_tag_values(n: int) -> list[str]:
    r = random.Random(1234)
    out: list[str] = []
    while len(out) < n:
        v = "".join(r.choice('ab ,=\\"ü#') for _ in range(r.randint(1, 12)))
        try:
            escape_tag_value(v)
        except LineProtocolError:
            continue
        out.append(v)
    return out


@needs_influxd
async def test_round_trip_exact(influx, db):
    values = TRICKY_TAG_VALUES + _random_tag_values(300)
    strings = ["", "plain", 'say "hi"', "back\\slash", "end\\", '\\"', "two\nlines\r\n", "a,b=c d", "ü😀"]
    records = []
    for i, value in enumerate(values):
        records.append(rec(
            device_id=f"meter-{i:04d}:x.y_z",
            ts_ns=TS0 + i * 1_000_003,
            tags={"site": value, "k ey,=x": values[(i + 1) % len(values)], "empty": "", "zone": "z"},
            fields={"v": (2**63 - 1, -2**63, i, -i)[i % 4],
                    "f": (0.1, 1e16, 5e-324, -2.5e-300, 1.7976931348623157e308, 1 / 3, float(i))[i % 7],
                    "b": i % 3 == 0,
                    "s": strings[i % len(strings)]}))

    async with await InfluxDBSink.open(influx.url, db, max_lines=128) as sink:
        await sink.write(records)

    types = {row["fieldKey"]: row["fieldType"] for row in await _rows(influx, 'SHOW FIELD KEYS FROM "telemetry"', db)}
    assert types == {"v": "integer", "f": "float", "b": "boolean", "s": "string"}
    got = {}
    for row in await _rows(influx, 'SELECT * FROM "telemetry" GROUP BY *', db):
        tags = {k: row[k] for k in ("device_id", "site", "k ey,=x", "empty", "zone") if row.get(k)}
        got[row["time"]] = (tags, {k: row[k] for k in ("v", "f", "b", "s")})
    expected = {r.ts_ns: ({"device_id": r.device_id, "site": r.tags["site"], "k ey,=x": r.tags["k ey,=x"],
                           "zone": "z"}, r.fields)
                for r in records}
    assert len(got) == len(records)
    for ts, (tags, fields) in expected.items():
        assert got[ts][0] == tags
        assert got[ts][1] == fields            # 1e16 comes back as the JSON int 10000000000000000: == holds
        assert type(got[ts][1]["v"]) is int


@needs_influxd
async def test_same_batch_twice_is_idempotent(influx, db):
    # InfluxDB's side of replays: a point written again is overwritten, not added.
    records = [rec(f"d{i % 10}", TS0 + i, {"v": i}, {"zone": "a b"}) for i in range(500)]
    async with await InfluxDBSink.open(influx.url, db, max_lines=200) as sink:
        await sink.write(records)
        await sink.write(records)
    # A replay chunked differently, with newer field values: same points, overwritten.
    async with await InfluxDBSink.open(influx.url, db, max_lines=77) as sink:
        await sink.write([rec(r.device_id, r.ts_ns, {"v": -r.fields["v"]}, r.tags) for r in records])
    assert await _count(influx, db) == 500
    assert (await _rows(influx, 'SELECT SUM("v") FROM "telemetry"', db))[0]["sum"] == -sum(range(500))


@needs_influxd
async def test_ten_thousand_records_in_one_write(influx, db):
    records = [rec(f"meter-{i % 997:04d}", TS0 + i, {"v": i, "temperature_mc": 20000 + i % 50},
                   {"region": "shanghai", "site": "factory-a"}) for i in range(10_000)]
    async with await InfluxDBSink.open(influx.url, db, max_lines=3000) as sink:
        await sink.write(records)
    assert await _count(influx, db) == 10_000
    assert (await _rows(influx, 'SELECT SUM("v") FROM "telemetry"', db))[0]["sum"] == sum(range(10_000))


@needs_influxd
async def test_open_creates_database_and_custom_measurement(influx, db):
    async with await InfluxDBSink.open(influx.url, db, "readings, v2") as sink:
        await sink.write([rec()])
    async with await InfluxDBSink.open(influx.url, db, "readings, v2"):   # exists already: fine
        pass
    databases = await trio.to_thread.run_sync(influx.query, "SHOW DATABASES")
    assert [db] in databases["results"][0]["series"][0]["values"]
    assert await _count(influx, db, "battery_mv", "readings, v2") == 1


@needs_influxd
async def test_server_errors_carry_its_text(influx, db):
    async with InfluxDBSink(influx.url, db) as sink:      # no CREATE DATABASE
        with pytest.raises(InfluxDBHTTPError, match="database not found") as info:
            await sink.write([rec()])
        assert info.value.status == 404 and info.value.retryable
        await sink.create_database()
        await sink.write([rec(fields={"v": 1})])
        with pytest.raises(InfluxDBHTTPError, match="field type conflict") as info:
            await sink.write([rec(ts_ns=TS0 + 1, fields={"v": 1.5})])
        assert info.value.status == 400 and not info.value.retryable


@pytest.fixture
def own_influx(tmp_path):
    """An influxd of this test's own, to kill."""
    proc = InfluxProcess(tmp_path / "influxd")
    proc.start()
    yield proc
    proc.stop()


@needs_influxd
async def test_killed_server_raises_then_recovers(own_influx, db):
    influx = own_influx

    async def write(sink, start):
        await sink.write([rec(f"d{i}", TS0 + start + i, {"v": i}) for i in range(100)])

    async with await InfluxDBSink.open(influx.url, db, timeout_s=2.0) as sink:
        await write(sink, 0)
        await trio.to_thread.run_sync(influx.kill)       # SIGKILL: no shutdown, no flush
        with pytest.raises(InfluxDBUnavailableError) as info:
            await write(sink, 1000)
        # failed from the dead connection, not by waiting out timeout_s
        assert isinstance(info.value.__cause__, httpx.TransportError)
        assert not isinstance(info.value.__cause__, httpx.TimeoutException)
        assert info.value.retryable
        await trio.to_thread.run_sync(influx.restart)    # same dirs, same port
        await write(sink, 2000)                          # the same sink reconnects
    # What was acknowledged before the kill survived it; the failed write left nothing.
    rows = await _rows(influx, 'SELECT "v" FROM "telemetry"', db)
    assert sorted(row["time"] - TS0 for row in rows) == [*range(100), *range(2000, 2100)]
