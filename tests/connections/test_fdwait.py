"""gridgate.connections.fdwait.wait_readable behaves as trio's
wait_readable (wake-up, cancellation, one reader per fd, notify_closing)
while parking a task under no coroutine frame of its own."""
from __future__ import annotations

import socket

import pytest
import trio
import trio.testing

from gridgate.connections import fdwait


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    a.setblocking(False)
    yield a, b
    a.close()
    b.close()


async def test_the_shallow_wait_is_in_use_here():
    # the test suite runs on Linux with trio's epoll IO manager: the other
    # tests here exercise the shallow path, not the fallback
    assert fdwait.SHALLOW
    assert type(fdwait.wait_readable(0)) is fdwait._ReadableWait


async def test_wakes_when_the_socket_turns_readable(pair):
    a, b = pair
    woke = trio.Event()

    async def reader() -> None:
        await fdwait.wait_readable(a.fileno())
        woke.set()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            assert not woke.is_set()
            b.send(b"x")
            await woke.wait()
    assert a.recv(1) == b"x"


async def test_a_parked_task_holds_no_coroutine_frame_of_the_wait(pair):
    a, _ = pair

    async def reader() -> None:
        await fdwait.wait_readable(a.fileno())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        [task] = nursery.child_tasks
        # the reader's own frame, then the wait object: nothing between
        assert task.coro.cr_code.co_name == "reader"
        assert type(task.coro.cr_await) is fdwait._ReadableWait
        nursery.cancel_scope.cancel()


async def test_cancelling_the_wait_unregisters_the_fd(pair):
    a, b = pair
    with trio.move_on_after(0.05) as scope:
        await fdwait.wait_readable(a.fileno())
    assert scope.cancelled_caught
    # the fd is free again: another wait takes it (no BusyResourceError) and wakes
    b.send(b"y")
    with trio.fail_after(5):
        await fdwait.wait_readable(a.fileno())
    assert a.recv(1) == b"y"


async def test_two_readers_of_one_fd_are_refused_as_trio_refuses_them(pair):
    a, _ = pair

    async def reader() -> None:
        await fdwait.wait_readable(a.fileno())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await fdwait.wait_readable(a.fileno())
        with pytest.raises(trio.BusyResourceError):       # trio's own sees the same registration
            await trio.lowlevel.wait_readable(a.fileno())
        nursery.cancel_scope.cancel()


async def test_notify_closing_wakes_the_reader_with_closed_resource_error(pair):
    a, _ = pair
    raised: list[BaseException] = []

    async def reader() -> None:
        try:
            await fdwait.wait_readable(a.fileno())
        except trio.ClosedResourceError as exc:
            raised.append(exc)

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            trio.lowlevel.notify_closing(a.fileno())
    assert len(raised) == 1


async def test_without_the_epoll_internals_it_is_trios_wait_readable(pair, monkeypatch):
    a, b = pair
    monkeypatch.setattr(fdwait, "SHALLOW", False)
    waiting = fdwait.wait_readable(a.fileno())
    assert type(waiting) is not fdwait._ReadableWait
    b.send(b"z")
    with trio.fail_after(5):
        await waiting
    assert a.recv(1) == b"z"
