"""DurableTimeouts: one task answers every fast-engine request whose commit
takes longer than durable_timeout_s, and forgets the ones that made it."""
from __future__ import annotations

import trio
import trio.testing

from gridgate.ingest.durable_timeouts import DurableTimeouts
from gridgate.protocols.http.api import Pending


def pending() -> Pending:
    return Pending(trio.Event(), [], [])


async def test_late_requests_expire_at_their_own_deadline_and_done_ones_are_forgotten(nursery, autojump_clock):
    timeouts = DurableTimeouts(30)
    await nursery.start(timeouts.run)
    t0 = trio.current_time()
    first, quick = pending(), pending()
    timeouts.add(first)
    timeouts.add(quick)
    await trio.sleep(10)
    late = pending()
    timeouts.add(late)
    quick.done.set()                    # committed in time
    await first.done.wait()
    assert trio.current_time() == t0 + 30
    assert first.expired and not quick.expired and not late.done.is_set()
    await late.done.wait()
    assert trio.current_time() == t0 + 10 + 30 and late.expired
    assert len(timeouts) == 0
    # a steady stream of requests that all commit: none is kept for the
    # whole timeout, the deque holds at most SWEEP_S worth (one sweep's adds
    # and the one not yet done), and a sweep after the last one empties it
    most = 0
    stream = [pending() for _ in range(200)]
    for p in stream:
        timeouts.add(p)
        most = max(most, len(timeouts))
        await trio.sleep(0.01)
        p.done.set()
    assert 1 < most <= round(timeouts.SWEEP_S / 0.01) + 1
    await trio.sleep(timeouts.SWEEP_S)
    await trio.testing.wait_all_tasks_blocked()     # a sweep due at this very time has run
    assert len(timeouts) == 0
    assert not any(p.expired for p in stream)


def test_a_later_run_measures_deadlines_on_its_own_clock():
    """add() reads the clock of the run its run() task belongs to; once that
    run is over, another run's adds (before and after its run() starts) use
    that run's clock, not the finished one's."""
    timeouts = DurableTimeouts(30)

    async def first() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(timeouts.run)
            await trio.sleep(5)
            nursery.cancel_scope.cancel()

    async def second() -> None:
        trio.lowlevel.current_clock().jump(1000)          # this run's clock is far from the first's
        early = pending()
        timeouts.add(early)                               # before this run's run() starts
        async with trio.open_nursery() as nursery:
            await nursery.start(timeouts.run)
            await trio.sleep(10)
            late = pending()
            timeouts.add(late)
            await early.done.wait()
            assert trio.current_time() == 1030 and early.expired and not late.done.is_set()
            await late.done.wait()
            assert trio.current_time() == 1040
            nursery.cancel_scope.cancel()

    trio.run(first, clock=trio.testing.MockClock(autojump_threshold=0))
    trio.run(second, clock=trio.testing.MockClock(autojump_threshold=0))


def test_an_answered_request_lets_go_of_its_readings():
    """A done request stays in the deque until the next sweep: its records
    (and rejections) must go when its answer is made, not then."""
    from gridgate.ingest.records import Record, Rejection
    records = [Record(device_id="m1", ts_ns=1, received_ns=1, protocol="http", fields={"x": 1}, tags={})]
    rejections = [Rejection(reason="out_of_range", field="x", index=1, device_id="m1", detail="too big")]
    done = trio.Event()
    request = Pending(done, records, rejections)
    done.set()
    answer = request.result()
    assert answer[0] == 202 and b'"accepted":1' in answer[1] and b'"out_of_range"' in answer[1]
    assert not request.records and not request.rejections
    assert request.result() is answer           # asked again: the same answer
