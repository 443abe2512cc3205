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
    written: list[int] = []

    async def write(records, dead, on_commit=None):
        written.append(len(records))

    pipeline = Pipeline(write, batch_max_records=1000, batch_max_delay_s=0, queue_max_items=2,
                        queue_max_records=1000, metrics=Metrics())
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
