"""api.Done, the one-waiter trio.Event of each HTTP telemetry request."""
from __future__ import annotations

import pytest
import trio
import trio.testing

from gridgate.protocols.http.api import Done


async def test_a_waiter_wakes_when_set_and_later_waits_return_at_once(autojump_clock):
    done = Done()
    woke: list[float] = []

    async def waiter() -> None:
        await done.wait()
        woke.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.sleep(5)
        assert not done.is_set() and woke == []
        done.set()
        done.set()                      # a second set changes nothing
    assert done.is_set() and woke == [5.0]
    with trio.testing.assert_checkpoints():
        await done.wait()


async def test_a_cancelled_wait_leaves_it_waitable(autojump_clock):
    done = Done()
    with trio.move_on_after(1) as scope:
        await done.wait()
    assert scope.cancelled_caught and not done.is_set()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(done.wait)
        await trio.testing.wait_all_tasks_blocked()
        done.set()


async def test_a_second_waiter_is_refused():
    done = Done()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(done.wait)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(RuntimeError, match="one waiter"):
            await done.wait()
        done.set()


async def test_then_is_called_once_on_set_after_the_waiter_is_woken():
    done = Done()
    calls: list[bool] = []

    class Owner:
        def answered(self) -> None:
            calls.append(done.is_set())

    done.then = Owner()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(done.wait)
        await trio.testing.wait_all_tasks_blocked()
        done.set()
        done.set()
        assert calls == [True] and done.then is None
