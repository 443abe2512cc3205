"""The session->batcher queue is bounded in items and in the readings they
carry: a reader stops (try_submit False, submit waits) once the queued
readings would pass queue_max_records, and an empty queue takes any item."""
from __future__ import annotations

import pytest
import trio
import trio.testing

from gridgate.ingest.pipeline import Pipeline, WorkItem
from gridgate.ingest.records import Record, Rejection
from gridgate.observability.metrics import Metrics


def item(n: int) -> WorkItem:
    records = [Record(device_id="meter-1", ts_ns=i, received_ns=i, protocol="mqtt", fields={"x": i}, tags={})
               for i in range(n)]
    return WorkItem(records, [], "mqtt", 0)


def recording(**bounds: int) -> tuple[Pipeline, list[int]]:
    """A pipeline (no batch timer) whose write records each batch's record count."""
    written: list[int] = []

    async def write(records, dead, on_commit=None):
        written.append(len(records))

    return Pipeline(write, batch_max_records=1000, batch_max_delay_s=0, metrics=Metrics(), **bounds), written


async def test_queued_readings_are_bounded_and_an_empty_queue_takes_a_big_item(autojump_clock):
    written: list[int] = []
    gate = trio.Event()

    async def write(records, dead, on_commit=None):
        await gate.wait()
        written.append(len(records))

    start = trio.current_time()
    pipeline = Pipeline(write, batch_max_records=1000, batch_max_delay_s=0, queue_max_items=100,
                        queue_max_records=10, metrics=Metrics())
    # nothing queued: even an item over the bound goes in
    assert pipeline.try_submit(item(25))
    assert not pipeline.try_submit(item(1))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pipeline.run)
        await trio.testing.wait_all_tasks_blocked()      # the batcher took the 25 and is writing them
        assert pipeline.try_submit(item(6))
        assert not pipeline.try_submit(item(6))          # 12 > 10
        submitted = trio.Event()

        async def submit_blocked():
            await pipeline.submit(item(6))
            submitted.set()

        nursery.start_soon(submit_blocked)
        await trio.testing.wait_all_tasks_blocked()
        assert not submitted.is_set()                    # held back: the reader waits
        gate.set()                                       # writes finish, the batcher takes the 6
        await submitted.wait()
        await pipeline.close_input()
        await pipeline.wait_finished()
    assert sum(written) == 25 + 6 + 6
    assert trio.current_time() == start     # batch_max_delay_s=0: no batch waited on a timer


async def test_items_are_acked_once_at_commit_and_a_failing_ack_costs_only_its_own(caplog, autojump_clock):
    acked: list[str] = []
    gate = trio.Event()

    async def write(records, dead, on_commit=None):
        on_commit()                      # durable: acks go out while the write still runs
        assert acked == ["a", "c"]
        await gate.wait()

    def broken() -> None:
        raise RuntimeError("a session bug")

    pipeline = Pipeline(write, batch_max_records=1000, batch_max_delay_s=0, queue_max_items=100,
                        metrics=Metrics())
    for on_durable in (lambda: acked.append("a"), broken, lambda: acked.append("c")):
        assert pipeline.try_submit(WorkItem(item(2).records, [], "mqtt", 0, on_durable))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pipeline.run)
        await trio.testing.wait_all_tasks_blocked()
        assert acked == ["a", "c"]
        gate.set()
        await pipeline.close_input()
        await pipeline.wait_finished()
    assert acked == ["a", "c"]       # not again once the write returned
    assert pipeline.accepted == 6
    assert "acknowledging 2 readings failed" in caplog.text and "a session bug" in caplog.text


async def test_items_are_bounded_and_a_closed_input_refuses_waiting_and_new_submitters(autojump_clock):
    pipeline, written = recording(queue_max_items=2, queue_max_records=1000)
    assert pipeline.try_submit(item(1))
    assert pipeline.try_submit(item(1))
    assert not pipeline.try_submit(item(1))             # 2 items queued: full in items, not readings
    assert pipeline.queued() == 2
    refused: list[BaseException] = []

    async def submit_blocked():
        try:
            await pipeline.submit(item(1))
        except trio.ClosedResourceError as exc:
            refused.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(submit_blocked)
        await trio.testing.wait_all_tasks_blocked()
        assert not refused                              # waiting for room
        await pipeline.close_input()
        await trio.testing.wait_all_tasks_blocked()
        assert len(refused) == 1                        # the close reached the waiting submitter
        with pytest.raises(trio.ClosedResourceError):
            pipeline.try_submit(item(1))
        nursery.start_soon(pipeline.run)
        await pipeline.wait_finished()                  # what was queued is written, then the batcher ends
    assert written == [2]
    assert pipeline.take_unwritten() == []


class _Steps(trio.abc.Instrument):
    """How many times each named task has run a step."""

    def __init__(self) -> None:
        self.steps: dict[str, int] = {}

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps[task.name] = self.steps.get(task.name, 0) + 1


async def test_waiting_readers_are_queued_in_their_order_and_only_those_that_fit_are_woken(autojump_clock):
    """A batch taken queues the waiting readers' items first come first
    served while they fit, and wakes just their tasks: the one that does not
    fit yet is not woken to find the queue full (the whole herd was)."""
    written: list[list[int]] = []
    gate = trio.Event()

    async def write(records, dead, on_commit=None):
        written.append([r.ts_ns for r in records])
        await gate.wait()

    def tagged(first: int, n: int) -> WorkItem:
        return WorkItem([Record(device_id="meter-1", ts_ns=first + i, received_ns=0, protocol="mqtt",
                                fields={"x": i}, tags={}) for i in range(n)], [], "mqtt", 0)

    pipeline = Pipeline(write, batch_max_records=1000, batch_max_delay_s=0, queue_max_items=100,
                        queue_max_records=10, metrics=Metrics())
    assert pipeline.try_submit(tagged(0, 10))
    queued_in: list[str] = []
    steps = _Steps()
    trio.lowlevel.add_instrument(steps)
    try:
        async with trio.open_nursery() as nursery:
            async def reader(name: str, first: int, n: int) -> None:
                await pipeline.submit(tagged(first, n))
                queued_in.append(name)

            for name, first, n in (("a", 100, 3), ("b", 200, 3), ("c", 300, 3), ("d", 400, 5)):
                nursery.start_soon(reader, name, first, n, name=name)
                await trio.testing.wait_all_tasks_blocked()    # in line in this order
            assert queued_in == [] and pipeline.queued() == 1
            d_steps = steps.steps["d"]
            nursery.start_soon(pipeline.run)
            await trio.testing.wait_all_tasks_blocked()
            # the batcher took the 10 (its write waits on the gate): a, b and c fit (9), d (14) does not
            assert written == [list(range(10))]
            # (woken in whatever order trio runs them; queued in theirs: the second batch below)
            assert sorted(queued_in) == ["a", "b", "c"] and pipeline.queued() == 3
            assert steps.steps["d"] == d_steps               # d was not woken for nothing
            gate.set()
            await trio.testing.wait_all_tasks_blocked()
            assert sorted(queued_in) == ["a", "b", "c", "d"]
            await pipeline.close_input()
            await pipeline.wait_finished()
    finally:
        trio.lowlevel.remove_instrument(steps)
    assert written == [list(range(10)), [100, 101, 102, 200, 201, 202, 300, 301, 302], [400, 401, 402, 403, 404]]


async def test_a_reader_cancelled_while_waiting_queues_nothing_and_the_next_takes_its_place(autojump_clock):
    pipeline, written = recording(queue_max_items=100, queue_max_records=10)
    assert pipeline.try_submit(item(10))
    outcomes: list[str] = []
    async with trio.open_nursery() as nursery:
        async def reader(name: str, n: int, scope: trio.CancelScope) -> None:
            with scope:
                await pipeline.submit(item(n))
                outcomes.append(f"{name} queued")
                return
            outcomes.append(f"{name} cancelled")

        first, second = trio.CancelScope(), trio.CancelScope()
        nursery.start_soon(reader, "first", 3, first)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(reader, "second", 4, second)
        await trio.testing.wait_all_tasks_blocked()
        first.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert outcomes == ["first cancelled"]
        nursery.start_soon(pipeline.run)
        await trio.testing.wait_all_tasks_blocked()
        assert outcomes == ["first cancelled", "second queued"]
        await pipeline.close_input()
        await pipeline.wait_finished()
    assert written == [10, 4]              # the cancelled reader's 3 were never queued


async def test_after_a_lull_the_batcher_waits_for_company_and_wakes_for_each_arrival(autojump_clock):
    written: list[int] = []

    async def write(records, dead, on_commit=None):
        written.append(len(records))

    pipeline = Pipeline(write, batch_max_records=3, batch_max_delay_s=0.5, queue_max_items=100, metrics=Metrics())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pipeline.run)
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        assert pipeline.try_submit(item(1))
        await trio.sleep(0.1)
        assert pipeline.try_submit(item(1))
        await trio.sleep(0.1)
        assert pipeline.try_submit(item(1))             # the third fills the batch before the window ends
        await trio.testing.wait_all_tasks_blocked()
        assert written == [3]
        assert trio.current_time() - start == pytest.approx(0.2)
        assert pipeline.try_submit(item(2))             # right after a write: no lull, no wait for company
        await trio.testing.wait_all_tasks_blocked()
        assert written == [3, 2]
        await pipeline.close_input()
        await pipeline.wait_finished()


async def test_rejections_count_toward_the_queued_readings_and_the_batch(autojump_clock):
    """An item's size is its readings and its rejections (each a dead letter to
    write): both fill queue_max_records, and both fill batch_max_records."""
    batches: list[tuple[int, int]] = []

    async def write(records, dead, on_commit=None):
        batches.append((len(records), len(dead)))

    def rejected(n: int) -> WorkItem:
        return WorkItem([], [Rejection(reason="malformed", device_id="meter-1") for _ in range(n)], "mqtt", 0)

    pipeline = Pipeline(write, batch_max_records=8, batch_max_delay_s=0, queue_max_items=100,
                        queue_max_records=10, metrics=Metrics())
    assert pipeline.try_submit(rejected(6))
    assert pipeline.try_submit(item(2))
    assert not pipeline.try_submit(rejected(3))          # 6 + 2 + 3 > 10
    assert pipeline.try_submit(WorkItem(item(1).records, [Rejection(reason="malformed")], "mqtt", 0))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pipeline.run)
        await pipeline.close_input()
        await pipeline.wait_finished()
    assert batches == [(2, 6), (1, 1)]                   # 8 fill the first batch
