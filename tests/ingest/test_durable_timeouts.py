"""DurableTimeouts: one task answers every fast-engine request whose commit
takes longer than durable_timeout_s, and forgets the ones that made it."""
from __future__ import annotations

import pytest
import trio
import trio.testing

from gridgate.ingest.durable_timeouts import DurableTimeouts
from gridgate.protocols.http.api import Pending


def pending() -> Pending:
    return Pending(trio.Event(), [], [])


def test_late_requests_expire_at_their_own_deadline_and_done_ones_are_forgotten():
    async def main():
        timeouts = DurableTimeouts(30)
        async with trio.open_nursery() as nursery:
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
            assert trio.current_time() - t0 == pytest.approx(30)
            assert first.expired and not quick.expired and not late.done.is_set()
            await late.done.wait()
            assert trio.current_time() - t0 == pytest.approx(40) and late.expired
            assert len(timeouts) == 0
            # a steady stream of requests that all commit: none is kept for
            # the whole timeout, the deque holds about SWEEP_S worth
            for _ in range(200):
                p = pending()
                timeouts.add(p)
                await trio.sleep(0.01)
                p.done.set()
            await trio.sleep(timeouts.SWEEP_S)
            assert len(timeouts) <= 1
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
