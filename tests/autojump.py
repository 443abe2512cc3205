"""Start an embedded gateway under pytest-trio's ``autojump_clock`` with the
clock standing still, so the test's times start from a known point.

Why: ``gridgate.serve`` opens the spool and counts its pending rows on worker
threads (``trio.to_thread``). While a thread runs, every task is blocked, so
the autojump clock leaps to the next deadline (the reaper's 30 s scan), again
and again, until the thread is done: the clock reads 0, 30, or 100,000 s when
``nursery.start`` returns, depending on how busy the machine is. A test that
then sums float sleeps (``29.999 + 0.001``) meets a deadline the code computed
as ``now + 30`` at some start times and misses it by one ulp at others (it did
at 30.0). Starting with the clock still makes the start time 0.0 wherever the
test runs; the tests then state deadlines as ``start + x``, as the code does.
"""
from __future__ import annotations

import math

import trio
import trio.testing

import gridgate

__all__ = ["start_still"]


async def start_still(nursery: trio.Nursery, config: gridgate.Config, sink=None) -> gridgate.Gateway:
    """``await nursery.start(gridgate.serve, config, sink)`` with the autojump
    turned off until the gateway is serving, then on again.

    Returns:
        The serving Gateway; the clock reads what it read before the call.

    Error handling: raises AssertionError when the run's clock is not a
    MockClock (the test forgot the ``autojump_clock`` fixture).
    """
    clock = trio.lowlevel.current_clock()
    assert isinstance(clock, trio.testing.MockClock), "use the autojump_clock fixture"
    before = trio.current_time()
    threshold = clock.autojump_threshold
    clock.autojump_threshold = math.inf
    try:
        gateway = await nursery.start(gridgate.serve, config, sink)
    finally:
        clock.autojump_threshold = threshold
    assert trio.current_time() == before
    return gateway
