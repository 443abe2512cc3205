"""The batcher between protocol sessions and the sink.

Sessions submit one WorkItem per socket read (all readings and rejections of
that read, plus what to do once they are durable) into a bounded queue: a
full queue blocks the submitting reader, which stops reading its
socket (backpressure) instead of growing memory. The batcher takes items,
writes them as one batch (group commit: everything already queued goes in,
then, if the batcher had been idle, it waits at most ``batch_max_delay_ms``
for more up to ``batch_max_records``; under steady load the previous write
was that window, so it writes at once), and once the batch is durable calls each item's
``on_durable`` - which is where MQTT PUBACKs and HTTP 202s come from. That is
when the write returns, or sooner: the spool's compiled writer lets the first
session that sees the commit done run the acks (``SpoolSink.poll``).

A failed write is retried with backoff, never dropped: while it fails, the
queue fills and every reader is held back.
"""
from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Protocol

import outcome
import trio

from gridgate.ingest.records import Record, Rejection

if TYPE_CHECKING:
    from gridgate.observability.metrics import Metrics

__all__ = ["WorkItem", "Pipeline", "WriteFn"]

log = logging.getLogger("gridgate.ingest.pipeline")

# write(records, dead_letters, on_commit) must return only once both are
# durable; it may call on_commit (once, when not None) as soon as they are,
# before it returns, so acks need not wait for the writing task's next turn.
# dead_letters: (protocol, received_ns, rejection) triples.
WriteFn = Callable[[list[Record], list[tuple[str, int, Rejection]], "Callable[[], None] | None"], Awaitable[None]]


class Pausable(Protocol):
    """A reader the pipeline may hold back (a connection's Session): the reaper
    must see it as paused, not silent."""

    paused: bool


class WorkItem:
    """One read's readings and rejections, and what to run once they are durable.

    ``records`` and ``rejections`` are complete when the item is made: no
    session adds to them afterwards (each builds them for the read, then
    makes the item; the pipeline, the gateway's hard stop and the answers
    only read them). ``size``, their count, is taken once here: the
    queue's bound and the batcher read it per item.
    """
    __slots__ = ("records", "rejections", "protocol", "received_ns", "on_durable", "size")

    def __init__(self, records: Sequence[Record], rejections: Sequence[Rejection], protocol: str,
                 received_ns: int, on_durable: Callable[[], None] | None = None) -> None:
        self.records = records
        self.rejections = rejections
        self.protocol = protocol
        self.received_ns = received_ns
        self.on_durable = on_durable
        self.size = len(records) + len(rejections)


class _Waiter:
    """A reader held back by a full queue: its task and the item it waits to queue."""
    __slots__ = ("task", "item")

    def __init__(self, task: trio.lowlevel.Task, item: WorkItem) -> None:
        self.task = task
        self.item = item


class Pipeline:
    def __init__(self, write: WriteFn, *, batch_max_records: int, batch_max_delay_s: float,
                 queue_max_items: int, metrics: Metrics, queue_max_records: int = 20_000) -> None:
        self._write = write
        self.batch_max_records = batch_max_records
        self.batch_max_delay_s = batch_max_delay_s
        self.metrics = metrics
        # A deque, not a Trio memory channel: under the fleet shape (1,000
        # devices x 1 in flight) every reading is an item, and the channel's
        # send_nowait and the batcher's receive_nowait per item were Python
        # calls with KI-protection wrappers each; here an item is an append
        # and a popleft. Bounded in items (queue_max_items) and, since one
        # 64 KiB read of QoS 0 publishes can carry ~1,000 readings, in the
        # readings they hold. An item is always let into an empty queue,
        # however big.
        self.queue_max_items = queue_max_items
        self.queue_max_records = queue_max_records
        self._queue: deque[WorkItem] = deque()
        self._queued_records = 0
        self._closed = False
        # Set (then dropped) by the first item after the batcher found the queue empty.
        self._arrived: trio.Event | None = None
        # Readers held back by a full queue, first come first served. When the
        # batcher takes a batch, it queues as many of their items as now fit
        # and wakes just those readers. (One Event for all of them woke every
        # waiting reader per batch, about 87 of 100 under a QoS 0 flood, and
        # all but a few found the queue full again and went back to sleep:
        # task switches on the loop the batcher shares.)
        self._waiting: deque[_Waiter] = deque()
        # Items taken from the queue but not yet durable: on a hard stop the
        # gateway writes these (and whatever is still queued) before closing.
        self._current: list[WorkItem] = []
        self._finished = trio.Event()
        self._last_flush_end = -math.inf
        # plain counters for the summary log line
        self.accepted = 0
        self.rejected = 0
        self.batches = 0

    # -- producer side ------------------------------------------------------

    def _has_room(self, size: int) -> bool:
        if len(self._queue) >= self.queue_max_items:
            return False
        queued = self._queued_records
        return not queued or queued + size <= self.queue_max_records

    def _put(self, item: WorkItem, size: int) -> None:
        self._queue.append(item)
        self._queued_records += size
        arrived = self._arrived
        if arrived is not None:
            self._arrived = None
            arrived.set()

    def try_submit(self, item: WorkItem) -> bool:
        """Queue without waiting; False when the queue is full (items or readings).

        Raises:
            trio.ClosedResourceError: the input is closed (shutdown).
        """
        if self._closed:
            raise trio.ClosedResourceError("the pipeline takes no more items")
        # _has_room and _put written out: this runs once per socket read,
        # and under the fleet shape once per reading
        size = item.size
        queue = self._queue
        if len(queue) >= self.queue_max_items:
            return False
        queued = self._queued_records
        if queued and queued + size > self.queue_max_records:
            return False
        queue.append(item)
        self._queued_records = queued + size
        arrived = self._arrived
        if arrived is not None:
            self._arrived = None
            arrived.set()
        return True

    async def submit(self, item: WorkItem, session: Pausable | None = None) -> None:
        """Queue, waiting while the queue is full (backpressure).

        ``session``: the connection that waits is marked ``paused`` meanwhile,
        so the reaper sees a reader we hold back, not a silent device.
        """
        if session is None:
            return await self._submit(item)
        session.paused = True
        try:
            await self._submit(item)
        finally:
            session.paused = False

    async def _submit(self, item: WorkItem) -> None:
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._closed:
            raise trio.ClosedResourceError("the pipeline takes no more items")
        size = item.size
        waiting = self._waiting
        if not waiting and self._has_room(size):
            self._put(item, size)
            # a checkpoint either way, as a channel's send is
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        # In line behind the readers already waiting: the batcher queues the
        # item (_admit) and then wakes this task, or close_input wakes it with
        # ClosedResourceError. Cancelled while in line: the item was not queued.
        waiter = _Waiter(trio.lowlevel.current_task(), item)
        waiting.append(waiter)

        def abort(_: object) -> trio.lowlevel.Abort:
            waiting.remove(waiter)      # still in line: a queued item's task is rescheduled, never aborted
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def _admit(self) -> None:
        """Queue the waiting readers' items, in their order, while they fit, and wake their tasks."""
        waiting = self._waiting
        while waiting:
            waiter = waiting[0]
            size = waiter.item.size
            if not self._has_room(size):
                return
            waiting.popleft()
            self._put(waiter.item, size)
            trio.lowlevel.reschedule(waiter.task)

    def _taken(self, size: int) -> None:
        self._queued_records -= size
        if self._waiting:
            self._admit()

    def queued(self) -> int:
        return len(self._queue)

    async def close_input(self) -> None:
        """No more items: the batcher writes what is queued, then ends."""
        self._closed = True
        if self._arrived is not None:
            self._arrived.set()
        waiting, self._waiting = self._waiting, deque()
        for waiter in waiting:          # not queued: their readers see the close
            trio.lowlevel.reschedule(waiter.task, outcome.Error(
                trio.ClosedResourceError("the pipeline takes no more items")))
        await trio.lowlevel.checkpoint()

    async def wait_finished(self) -> None:
        await self._finished.wait()

    def take_unwritten(self) -> list[WorkItem]:
        """Everything accepted but not yet written (for a hard stop)."""
        items, self._current = self._current, []
        items.extend(self._queue)
        self._queue.clear()
        return items

    # -- the batcher --------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        queue = self._queue
        limit = self.batch_max_records
        try:
            while True:
                # Under load items are already waiting: take them without a
                # checkpoint, which would put the batcher behind every
                # runnable reader for a whole scheduler pass before each batch.
                await trio.lowlevel.checkpoint_if_cancelled()     # no yield unless cancelled
                if not queue:
                    if self._closed:
                        return
                    arrived = self._arrived = trio.Event()
                    await arrived.wait()
                    continue
                items = self._current = []
                size = 0
                while queue and size < limit:
                    item = queue.popleft()
                    items.append(item)
                    size += item.size
                # Wait for company only after a lull: back-to-back writes need
                # no delay, the items that arrived during a write are the batch.
                idle = trio.current_time() - self._last_flush_end >= self.batch_max_delay_s
                closed = self._closed
                if size < limit and not closed and self.batch_max_delay_s > 0 and idle:
                    with trio.move_on_after(self.batch_max_delay_s):
                        while size < limit:
                            if queue:
                                item = queue.popleft()
                                items.append(item)
                                size += item.size
                            elif self._closed:
                                break
                            else:
                                arrived = self._arrived = trio.Event()
                                await arrived.wait()
                self._taken(size)
                await self._flush(items)
                self._last_flush_end = trio.current_time()
        finally:
            self._finished.set()

    async def _flush(self, items: list[WorkItem]) -> None:
        records: list[Record] = []
        dead: list[tuple[str, int, Rejection]] = []
        # one labelled increment per protocol (and reason) per batch, not per item
        accepted: dict[str, int] = {}
        rejected: dict[tuple[str, str], int] = {}
        for item in items:
            if item.records:
                records.extend(item.records)
                accepted[item.protocol] = accepted.get(item.protocol, 0) + len(item.records)
            if item.rejections:
                protocol, received_ns = item.protocol, item.received_ns
                dead.extend([(protocol, received_ns, r) for r in item.rejections])
                for r in item.rejections:
                    key = (protocol, r.reason)
                    rejected[key] = rejected.get(key, 0) + 1
        acked = False

        def ack() -> None:
            nonlocal acked
            if not acked:
                acked = True
                _acknowledge(items)

        if records or dead:
            await self.write_with_retry(records, dead, ack)
        ack()
        self._current = []
        m = self.metrics
        for protocol, n in accepted.items():
            m.readings_accepted.labels(protocol).inc(n)
        for (protocol, reason), n in rejected.items():
            m.readings_rejected.labels(protocol, reason).inc(n)
        self.accepted += len(records)
        self.rejected += len(dead)
        if records or dead:
            self.batches += 1
            m.batches.inc()
            m.batch_records.observe(len(records) + len(dead))

    async def write_with_retry(self, records: list[Record], dead: list[tuple[str, int, Rejection]],
                               on_commit: Callable[[], None] | None = None) -> None:
        """Write until it succeeds. Nothing acknowledged may be lost, so a
        failing sink holds the pipeline (and, through it, every reader).
        ``on_commit``: see WriteFn."""
        delay = 0.05
        failures = 0
        while True:
            started = trio.current_time()
            try:
                await self._write(records, dead, on_commit)
            except Exception as exc:  # any sink failure: retry; Cancelled is not an Exception
                failures += 1
                self.metrics.sink_write_errors.labels(type(exc).__name__).inc()
                if failures == 1 or math.log2(failures).is_integer():
                    log.error("sink write of %d records failed (attempt %d), retrying in %.2fs: %s",
                              len(records) + len(dead), failures, delay, exc)
                await trio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            self.metrics.sink_write_seconds.observe(trio.current_time() - started)
            if failures:
                log.warning("sink write succeeded after %d failed attempts", failures)
            return


def _acknowledge(items: list[WorkItem]) -> None:
    """Run each item's on_durable. One that fails (a bug) is logged and
    costs only its own connection its acks, not the rest of the batch."""
    for item in items:
        if item.on_durable is not None:
            try:
                item.on_durable()
            except Exception:
                log.exception("acknowledging %d readings failed", item.size)
