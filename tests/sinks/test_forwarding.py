"""Store-and-forward: the circuit breaker and the Forwarder's timing under the
autojump MockClock (an in-memory sink and pending store, so every time is
exact), the spool's pending table, and a full spool with the sink down
(backpressure, HTTP 503, every accepted reading delivered once the sink is
back)."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
import trio
import trio.testing

from gridgate.config import SinkConfig
from gridgate.ingest.records import Record, Rejection
from gridgate.observability.metrics import Metrics
from gridgate.sinks.forwarding import BreakerState, CircuitBreaker, Forwarder
from gridgate.storage.spool import Spool
from inprocess import MemorySink


async def test_breaker_opens_probes_and_closes_on_the_clock(autojump_clock):
    changes: list[BreakerState] = []
    b = CircuitBreaker(failure_threshold=3, open_s=5.0, on_change=changes.append)
    assert b.allow()
    b.failure()
    b.failure()
    assert b.state == BreakerState.CLOSED and b.allow()     # two failures: still closed
    b.success()
    assert b.failures == 0                                  # a success resets the count
    for _ in range(3):
        b.failure()
    opened = trio.current_time()
    assert b.state == BreakerState.OPEN and not b.allow()
    assert b.retry_in() == 5.0
    await trio.sleep(4.5)
    assert not b.allow() and b.retry_in() == opened + 5.0 - trio.current_time()
    await trio.sleep_until(opened + 5.0)
    assert b.retry_in() == 0.0
    assert b.allow()                                        # the cool-down is over: one probe
    assert b.state == BreakerState.HALF_OPEN
    assert not b.allow()                                    # only one at a time
    b.failure()                                             # the probe failed: open again
    assert b.state == BreakerState.OPEN and b.retry_in() == 5.0
    await trio.sleep(5)
    assert b.allow()
    b.success()
    assert b.state == BreakerState.CLOSED and b.allow() and b.allow()
    assert changes == [BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.OPEN, BreakerState.HALF_OPEN,
                       BreakerState.CLOSED]


def _record(i: int) -> Record:
    return Record(device_id=f"m-{i}", ts_ns=1_000 + i, received_ns=2_000 + i, protocol="mqtt",
                  fields={"temperature_mc": 20_000 + i}, tags={"region": "sh"})


# -- the Forwarder on the autojump clock ----------------------------------------------------


class MemoryPendingStore:
    """The Forwarder's PendingStore in memory: numbered pending rows, oldest first."""

    def __init__(self, records: Sequence[Record] = ()) -> None:
        self.rows: list[tuple[int, Record]] = []
        self.dead: list[tuple[str, int, Rejection]] = []
        self.drained = trio.Event()            # set when a delete leaves nothing pending
        self._next_id = 1
        self._add(records)

    def _add(self, records: Sequence[Record]) -> None:
        for r in records:
            self.rows.append((self._next_id, r))
            self._next_id += 1

    @property
    def pending(self) -> list[Record]:
        return [r for _, r in self.rows]

    async def write_batch(self, records: Sequence[Record], dead: Sequence[tuple[str, int, Rejection]],
                          pending: bool = False, on_commit: Callable[[], None] | None = None) -> None:
        await trio.lowlevel.checkpoint()
        assert pending or not records          # the sink's records come here only as pending
        self._add(records)
        self.dead += dead

    async def pending_count(self) -> int:
        await trio.lowlevel.checkpoint()
        return len(self.rows)

    async def read_pending(self, limit: int) -> tuple[int, list[Record]]:
        await trio.lowlevel.checkpoint()
        rows = self.rows[:limit]
        return (rows[-1][0] if rows else 0), [r for _, r in rows]

    async def delete_pending(self, upto_id: int, count: int) -> None:
        await trio.lowlevel.checkpoint()
        kept = [(i, r) for i, r in self.rows if i > upto_id]
        assert len(self.rows) - len(kept) == count
        self.rows = kept
        if not kept:
            self.drained.set()


class ScriptedSink(MemorySink):
    """Fails while ``down``, never returns while ``hung``; logs every attempt
    as (time, records)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.hung = False
        self.attempts: list[tuple[float, int]] = []

    @property
    def records(self) -> list[Record]:
        return [r for b in self.batches for r in b]

    async def write(self, batch: Sequence[Record]) -> None:
        self.attempts.append((trio.current_time(), len(batch)))
        if self.hung:
            await trio.sleep_forever()
        if self.down:
            raise ConnectionError("sink down")
        await super().write(batch)


SETTINGS = SinkConfig(write_timeout_s=2.0, failure_threshold=2, open_s=5.0, replay_batch_records=1000,
                      replay_max_records_per_s=1000.0)


def _forwarder(sink: ScriptedSink, store: MemoryPendingStore, metrics: Metrics | None = None) -> Forwarder:
    async def never_opened():
        raise AssertionError("the sink is given")
    return Forwarder("fake", never_opened, store, SETTINGS, metrics or Metrics(), sink)


async def test_a_hung_sink_write_fails_at_write_timeout_and_is_kept_pending(autojump_clock):
    sink, store, metrics = ScriptedSink(), MemoryPendingStore(), Metrics()
    sink.hung = True
    forwarder = _forwarder(sink, store, metrics)
    batch = [_record(i) for i in range(10)]
    start = trio.current_time()
    await forwarder.write(batch, [])
    assert trio.current_time() == start + 2.0               # write_timeout_s, exactly
    assert sink.attempts == [(start, 10)] and sink.records == []
    assert store.pending == batch and forwarder.pending == 10
    assert (forwarder.breaker.state, forwarder.breaker.failures) == (BreakerState.CLOSED, 1)
    assert metrics.sink_write_errors.labels("TooSlowError")._value.get() == 1


async def test_while_the_breaker_is_open_nothing_is_tried_until_open_s(autojump_clock):
    sink, store = ScriptedSink(), MemoryPendingStore()
    sink.down = True
    forwarder = _forwarder(sink, store)
    batches = [[_record(10 * k + i) for i in range(10)] for k in range(5)]
    start = trio.current_time()
    await forwarder.write(batches[0], [])
    await forwarder.write(batches[1], [])                   # the second failure opens it
    assert forwarder.breaker.state == BreakerState.OPEN
    await forwarder.write(batches[2], [])                   # not tried
    await trio.sleep(4.5)
    await forwarder.write(batches[3], [])                   # still open: not tried
    assert sink.attempts == [(start, 10), (start, 10)]
    await trio.sleep_until(start + 5.0)
    sink.down = False
    await forwarder.write(batches[4], [])                   # the half-open probe: it goes through
    assert sink.attempts[2:] == [(start + 5.0, 10)] and sink.batches == [batches[4]]
    assert forwarder.breaker.state == BreakerState.CLOSED
    assert store.pending == [r for b in batches[:4] for r in b] and forwarder.pending == 40


async def test_replayer_probes_after_open_s_and_replays_at_the_configured_rate(autojump_clock, nursery):
    backlog = [_record(i) for i in range(2500)]             # pending from an earlier run
    sink, store = ScriptedSink(), MemoryPendingStore(backlog)
    sink.down = True
    forwarder = _forwarder(sink, store)
    start = trio.current_time()
    await nursery.start(forwarder.run_replayer)
    assert forwarder.pending == 2500
    await trio.sleep(1.0)                                   # two failures by now: open until start + 5.05
    assert forwarder.breaker.state == BreakerState.OPEN
    sink.down = False
    with trio.fail_after(60):                               # virtual seconds
        await store.drained.wait()
    # two failed tries 0.05 s apart (the retry pause), the probe open_s later,
    # then a batch of replay_batch_records per 1000 / replay_max_records_per_s s
    times = [t - start for t, _ in sink.attempts]
    assert times == pytest.approx([0.0, 0.05, 5.05, 6.05, 7.05], abs=1e-9)
    assert [n for _, n in sink.attempts] == [1000, 1000, 1000, 1000, 500]
    assert sink.records == backlog                          # oldest first, each once
    assert store.rows == [] and forwarder.pending == 0 and forwarder.replayed == 2500


# -- the spool's pending table ------------------------------------------------------------


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


# The gateway-level cases (a full spool with the sink down answers 503 and
# loses nothing; a record the sink can never take is dead-lettered
# sink_refused) run on both HTTP engines in tests/protocols/http/test_http_sinks.py.


# -- a batch's dead letters go to the spool while the sink takes its records ------------------

class SlowSink(ScriptedSink):
    """Takes ``delay`` seconds per write."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    async def write(self, batch: Sequence[Record]) -> None:
        await trio.sleep(self.delay)
        await super().write(batch)


class SlowDeadLetters(MemoryPendingStore):
    """Commits dead letters in ``delay`` seconds, noting when; raises ``error`` instead, if set."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay
        self.error: Exception | None = None
        self.dead_written_at: list[float] = []

    async def write_batch(self, records, dead, pending=False, on_commit=None) -> None:
        if dead:
            await trio.sleep(self.delay)
            if self.error is not None:
                raise self.error
            self.dead_written_at.append(trio.current_time())
        await super().write_batch(records, dead, pending, on_commit)


def _dead(n: int) -> list[tuple[str, int, Rejection]]:
    return [("mqtt", 5_000 + i, Rejection(reason="invalid_json", device_id=f"m-{i}", raw=b"{", detail="bad"))
            for i in range(n)]


async def test_dead_letters_are_committed_while_the_sink_writes(autojump_clock):
    sink, store = SlowSink(delay=1.0), SlowDeadLetters(delay=0.5)
    fwd = _forwarder(sink, store)
    records, dead = [_record(i) for i in range(10)], _dead(3)
    start = trio.current_time()
    await fwd.write(records, dead)
    # durable once the slower of the two is: 1.0 s, not 1.0 + 0.5 one after the other
    assert trio.current_time() - start == 1.0
    assert store.dead_written_at == [start + 0.5]
    assert sink.records == records and store.dead == dead and store.pending == []


async def test_sink_down_with_dead_letters_keeps_records_pending_and_each_dead_letter_once(autojump_clock):
    sink, store = SlowSink(delay=0.2), SlowDeadLetters(delay=0.5)
    sink.down = True
    fwd = _forwarder(sink, store)
    records, dead = [_record(i) for i in range(10)], _dead(3)
    await fwd.write(records, dead)
    assert store.pending == records and store.dead == dead and sink.records == []
    assert fwd.pending == 10


async def test_a_dead_letter_write_that_fails_raises_after_the_sink_write(autojump_clock):
    from gridgate.sinks.base import SinkFullError

    sink, store = SlowSink(delay=1.0), SlowDeadLetters(delay=0.1)
    store.error = SinkFullError("spool full")
    fwd = _forwarder(sink, store)
    records = [_record(i) for i in range(10)]
    start = trio.current_time()
    with pytest.raises(SinkFullError):
        await fwd.write(records, _dead(2))
    # the sink write was not cut short by it (its records are in, a retry de-duplicates)
    assert trio.current_time() - start == 1.0 and sink.records == records
    assert store.dead == [] and store.pending == []
