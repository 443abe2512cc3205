"""Store-and-forward to an external sink, behind a circuit breaker.

What fleets fear most is silent loss while a sink is down, and a memory
buffer that overflows. So with any sink other than the spool (InfluxDB,
NATS JetStream, a custom one), the spool stays underneath:

* A batch goes to the sink while its breaker lets it; when the write fails
  or times out, the batch is committed to the spool's ``pending`` table
  instead. Either way it is durable and is acknowledged: devices keep going.
* The breaker opens after ``failure_threshold`` consecutive failures; while
  it is open nothing is tried and batches go straight to pending. After
  ``open_s`` one probe (live or replayed) is let through: success closes it,
  failure opens it again.
* The replayer drains ``pending`` to the sink, oldest first, in batches of
  ``replay_batch_records`` and at most ``replay_max_records_per_s``, so live
  traffic keeps its latency; rows are deleted only after the sink took them.
  A crash between the two replays a batch: the sinks are idempotent for that
  (InfluxDB: same series and timestamp; JetStream: ``Nats-Msg-Id``).
* When the spool itself is full (``max_bytes``) and the sink is down, the
  pending write raises, the pipeline retries and fills, and the readers stop
  (MQTT stops reading, HTTP answers 503): nothing is dropped or overwritten.
"""
from __future__ import annotations

import enum
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Protocol

import msgspec
import trio

from gridgate.ingest.records import Record, Rejection
from gridgate.sinks.base import Sink

if TYPE_CHECKING:
    from gridgate.observability.metrics import Metrics

__all__ = ["BreakerState", "CircuitBreaker", "Forwarder", "sink_refusal", "sink_refused_any"]

log = logging.getLogger("gridgate.sink")


_record_json = msgspec.json.Encoder().encode

# The records an external sink refused in the live write that just returned
# (id(record) -> (record, why)), for the acks the pipeline runs right after it
# (an MQTT 5 PUBACK 0x83). A Forwarder drops its entries at its next write, when
# its acks have run. Each entry holds its record, so its id is not reused while
# it is in here (not even by a later gateway in the process, if this one's
# forwarder never writes again).
_refused: dict[int, tuple[Record, str]] = {}


def sink_refused_any() -> bool:
    """Whether a write just made had records refused (else no sink_refusal need be asked)."""
    return bool(_refused)


def sink_refusal(record: Record) -> str | None:
    """Why the external sink refused ``record`` in the write just made, else None."""
    entry = _refused.get(id(record))
    return entry[1] if entry is not None and entry[0] is record else None


class ForwardingSettings(Protocol):
    """``[sink]`` as store-and-forward reads it (``gridgate.config.SinkConfig``)."""

    @property
    def write_timeout_s(self) -> float: ...
    @property
    def failure_threshold(self) -> int: ...
    @property
    def open_s(self) -> float: ...
    @property
    def replay_batch_records(self) -> int: ...
    @property
    def replay_max_records_per_s(self) -> float: ...


class PendingStore(Protocol):
    """The store underneath (``gridgate.storage.spool.SpoolSink``): dead letters,
    and records the sink could not take yet, durably, oldest first."""

    async def write_batch(self, records: Sequence[Record], dead: Sequence[tuple[str, int, Rejection]],
                          pending: bool = False, on_commit: Callable[[], None] | None = None) -> None: ...
    async def pending_count(self) -> int: ...
    async def read_pending(self, limit: int) -> tuple[int, list[Record]]: ...
    async def delete_pending(self, upto_id: int, count: int) -> None: ...


class BreakerState(enum.IntEnum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    """Closed -> open after ``failure_threshold`` consecutive failures; open ->
    half-open after ``open_s``, where one caller probes; its result decides."""

    def __init__(self, failure_threshold: int, open_s: float,
                 on_change: Callable[[BreakerState], None] | None = None) -> None:
        self.failure_threshold = failure_threshold
        self.open_s = open_s
        self.state = BreakerState.CLOSED
        self.failures = 0
        self.opened_at = -math.inf
        self._probing = False
        self._on_change = on_change

    def _set(self, state: BreakerState) -> None:
        if state != self.state:
            self.state = state
            if self._on_change is not None:
                self._on_change(state)

    def allow(self) -> bool:
        """May a write be tried now? (In half-open, only one at a time.)"""
        if self.state == BreakerState.CLOSED:
            return True
        if self.state == BreakerState.OPEN:
            if trio.current_time() - self.opened_at < self.open_s:
                return False
            self._set(BreakerState.HALF_OPEN)
        if self._probing:
            return False
        self._probing = True
        return True

    def retry_in(self) -> float:
        """Seconds until ``allow`` may say yes (0 when it may now)."""
        if self.state == BreakerState.OPEN:
            return max(0.0, self.opened_at + self.open_s - trio.current_time())
        return 0.0

    def success(self) -> None:
        self.failures = 0
        self._probing = False
        self._set(BreakerState.CLOSED)

    def failure(self) -> None:
        self.failures += 1
        self._probing = False
        if self.state == BreakerState.HALF_OPEN or self.failures >= self.failure_threshold:
            self.opened_at = trio.current_time()
            self._set(BreakerState.OPEN)


class Forwarder:
    """The pipeline's write function for an external sink (see the module docstring)."""

    def __init__(self, name: str, open_sink: Callable[[], Awaitable[Sink]], spool: PendingStore,
                 config: ForwardingSettings, metrics: Metrics, sink: Sink | None = None) -> None:
        self.name = name
        self._open_sink = open_sink
        self.sink = sink
        self.spool = spool
        self.config = config
        self.metrics = metrics
        self.breaker = CircuitBreaker(config.failure_threshold, config.open_s, self._breaker_changed)
        self.pending = 0
        self.replayed = 0
        self._pending_added = trio.Event()
        self._refused_ids: list[int] = []      # this forwarder's entries in _refused
        metrics.breaker_state.labels(name).set(0)
        # a JetStream sink's own counters, read at scrape time from whichever sink is open then
        metrics.watch_jetstream(lambda: self.sink)

    def _breaker_changed(self, state: BreakerState) -> None:
        self.metrics.breaker_state.labels(self.name).set(int(state))
        if state == BreakerState.OPEN:
            log.error("sink %s: circuit open after %d failed writes; storing batches as pending "
                      "(probe in %.1fs)", self.name, self.breaker.failures, self.config.open_s)
        elif state == BreakerState.CLOSED:
            log.warning("sink %s: circuit closed; %d pending records to replay", self.name, self.pending)

    def describe(self) -> dict[str, object]:
        """For /readyz: breaker state and what waits for the sink."""
        return {"kind": self.name, "breaker": self.breaker.state.name.lower().replace("_", "-"),
                "pending": self.pending}

    # -- live writes ---------------------------------------------------------------------

    async def write(self, records: list[Record], dead: list[tuple[str, int, Rejection]]) -> None:
        """Durable when it returns: in the sink, or pending in the spool.

        Raises SinkFullError (spool at max_bytes) so the pipeline holds back.
        """
        if self._refused_ids:
            for i in self._refused_ids:
                _refused.pop(i, None)
            self._refused_ids.clear()
        if records:
            given = records
            records = list(records)
            refused: list[tuple[str, int, Rejection]] = []
            if dead:
                # The batch's dead letters go to the spool while the sink
                # takes its records, not after: one commit less in the wait
                # of every batch that had a rejection.
                ok = await self._sink_and_dead_letters(records, refused, dead)
                dead = []
            else:
                ok = await self._try_sink(records, refused)
            if refused:
                dead = refused
                taken = {id(r) for r in records}
                why = {(rejection.device_id, received_ns): rejection.detail for _, received_ns, rejection in refused}
                for r in given:
                    if id(r) not in taken:
                        _refused[id(r)] = (r, why.get((r.device_id, r.received_ns), self.name))
                        self._refused_ids.append(id(r))
            if ok:
                if dead:
                    await self.spool.write_batch([], dead)
                return
        await self.spool.write_batch(records, dead, pending=True)
        if records:
            self.pending += len(records)
            self.metrics.pending_records.set(self.pending)
            self._pending_added.set()

    async def _sink_and_dead_letters(self, records: list[Record], refused: list[tuple[str, int, Rejection]],
                                     dead: list[tuple[str, int, Rejection]]) -> bool:
        """:meth:`_try_sink` while ``dead`` is committed to the spool; both done when it returns.

        Raises what the dead-letter write raised (SinkFullError: the pipeline
        holds back and writes the whole batch again, which the sinks take
        idempotently), after the sink write is over.
        """
        failed: list[Exception] = []

        async def write_dead() -> None:
            try:
                await self.spool.write_batch([], dead)
            except Exception as exc:        # raised below, in the writer's own task
                failed.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(write_dead)
            ok = await self._try_sink(records, refused)
        if failed:
            raise failed[0]
        return ok

    async def _try_sink(self, records: list[Record], refused: list[tuple[str, int, Rejection]]) -> bool:
        """Write to the sink; False: not written (keep it pending).

        A record the sink can never take (an error with ``retryable = False``
        and the record's ``index``, e.g. a field InfluxDB reserves) is taken
        out of ``records`` into ``refused`` as a dead letter, and the rest is
        tried again: one such record must not hold every batch back forever.
        """
        if not self.breaker.allow():
            return False
        started = trio.current_time()
        try:
            with trio.fail_after(self.config.write_timeout_s):
                if self.sink is None:
                    self.sink = await self._open_sink()
                while True:
                    try:
                        await self.sink.write(records)
                        break
                    except Exception as exc:
                        index = getattr(exc, "index", None)
                        if getattr(exc, "retryable", True) or type(index) is not int or not 0 <= index < len(records):
                            raise
                        bad = records.pop(index)
                        refused.append((bad.protocol, bad.received_ns, Rejection(
                            reason="sink_refused", device_id=bad.device_id, detail=f"{self.name}: {exc}",
                            raw=_record_json(bad))))
                        self.metrics.readings_rejected.labels(bad.protocol, "sink_refused").inc()
                        log.warning("sink %s refused a record of %s (dead-lettered): %s", self.name,
                                    bad.device_id, exc)
                        if not records:
                            break
        except (Exception, trio.TooSlowError) as exc:   # Cancelled is not an Exception: it passes
            self.breaker.failure()
            self.metrics.sink_write_errors.labels(type(exc).__name__).inc()
            if self.breaker.failures == 1 or math.log2(self.breaker.failures).is_integer():
                log.warning("sink %s: write of %d records failed (%s: %s); kept as pending",
                            self.name, len(records), type(exc).__name__, exc)
            return False
        self.breaker.success()
        self.metrics.external_write_seconds.labels(self.name).observe(trio.current_time() - started)
        return True

    # -- replay --------------------------------------------------------------------------

    async def run_replayer(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.pending = await self.spool.pending_count()
        self.metrics.pending_records.set(self.pending)
        if self.pending:
            log.warning("sink %s: %d pending records from an earlier run will be replayed", self.name, self.pending)
        task_status.started()
        batch = self.config.replay_batch_records
        while True:
            if self.pending <= 0:
                self._pending_added = trio.Event()
                await self._pending_added.wait()
                continue
            wait = self.breaker.retry_in()
            if wait > 0:
                await trio.sleep(wait)
                continue
            last_id, records = await self.spool.read_pending(batch)
            if not records:
                self.pending = 0
                self.metrics.pending_records.set(0)
                continue
            count = len(records)
            refused: list[tuple[str, int, Rejection]] = []
            if not await self._try_sink(records, refused):
                # half-open with another probe running, or it failed: try later
                await trio.sleep(max(self.breaker.retry_in(), 0.05))
                continue
            if refused:
                await self.spool.write_batch([], refused)
            await self.spool.delete_pending(last_id, count)
            self.pending = max(0, self.pending - count)
            self.replayed += len(records)
            self.metrics.pending_records.set(self.pending)
            self.metrics.replayed_records.labels(self.name).inc(len(records))
            if self.pending == 0:
                log.warning("sink %s: every pending record replayed (%d in all this run)", self.name, self.replayed)
            await trio.sleep(len(records) / self.config.replay_max_records_per_s)

    async def aclose(self) -> None:
        if self.sink is not None:
            await self.sink.aclose()
