"""tests/autojump.start_still: the gateway starts (worker threads and all)
while the autojump clock stands still, and the autojump is back afterwards."""
from __future__ import annotations

import pytest
import trio

from autojump import start_still
from inprocess import MemorySink, make_config


async def test_the_gateway_starts_with_the_clock_still_then_time_jumps_again(tmp_path, autojump_clock, nursery):
    await trio.sleep(7)
    gateway = await start_still(nursery, make_config(tmp_path), MemorySink())
    assert trio.current_time() == 7.0
    assert autojump_clock.autojump_threshold == 0
    await trio.sleep(3600)                       # jumps again: no real hour passes
    assert trio.current_time() == 3607.0
    assert gateway.ready


async def test_without_the_mock_clock_it_refuses(tmp_path, nursery):
    with pytest.raises(AssertionError, match="use the autojump_clock fixture"):
        await start_still(nursery, make_config(tmp_path), MemorySink())
