"""The ready loop on its own, with real sockets (socket pairs): one task
serves every parked connection's readable socket inline, hands a parked
task back what its fast path returns (or the exception it raised), and a
parked task cancels like one waiting in wait_readable. The connection
here is a small echo-ish object, not the MQTT session (its own tests are
tests/protocols/mqtt/test_mqtt_ready_loop.py)."""
from __future__ import annotations

import os
import socket

import pytest
import trio
import trio.testing

from gridgate.connections import ready_loop
from gridgate.connections.ready_loop import RESUME, ReadyLoop

pytestmark = pytest.mark.skipif(not ready_loop.AVAILABLE, reason="needs trio's epoll IO manager")


class Conn:
    """Reads what is ready; b"!" hands the bytes so far to the task, b"?"
    raises in the fast path, EOF hands back False."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.got = b""
        self.calls = 0
        self.seen_at: float | None = None

    def ready_fd(self) -> int:
        return self.sock.fileno()

    def on_ready(self, now: float) -> object:
        self.calls += 1
        self.seen_at = now
        data = os.read(self.sock.fileno(), 1024)
        if not data:
            return False
        self.got += data
        if b"?" in data:
            raise ValueError(f"bad byte from {self.sock.fileno()}")
        if b"!" in data:
            got, self.got = self.got, b""
            return got
        return None


async def park_until_handed(loop: ReadyLoop, conn: Conn, results: list) -> None:
    """A connection task: park, keep what the loop hands back, park again,
    until EOF (False) or the loop stops (RESUME)."""
    while True:
        got = await loop.park(conn)
        results.append(got)
        if got is False or got is RESUME:
            return


def pairs(n: int) -> list[tuple[socket.socket, Conn]]:
    out = []
    for _ in range(n):
        a, b = socket.socketpair()
        out.append((a, Conn(b)))
    return out


async def test_many_connections_are_served_inline_without_waking_their_tasks():
    polled = []
    loop = ReadyLoop(lambda: polled.append(1))
    conns = pairs(100)
    results: list[list] = [[] for _ in conns]
    async with trio.open_nursery() as nursery:
        await nursery.start(loop.run)
        for (_, conn), res in zip(conns, results, strict=True):
            nursery.start_soon(park_until_handed, loop, conn, res)
        await trio.testing.wait_all_tasks_blocked()
        assert len(loop) == 100
        for rnd in range(3):
            for client, _ in conns:
                client.send(b"reading %d;" % rnd)
            await trio.testing.wait_all_tasks_blocked()
        # every byte read by the loop, no task woken for it
        assert all(conn.got == b"reading 0;reading 1;reading 2;" for _, conn in conns)
        assert all(res == [] for res in results)
        assert loop.handed_back == 0 and loop.served >= 300
        # a pass serves many sockets, and polls the durable commit once
        assert loop.passes < loop.served and len(polled) == loop.passes
        # the current time of the pass, for the reaper's last_seen
        assert all(conn.seen_at is not None and conn.seen_at <= trio.current_time() for _, conn in conns)
        for client, _ in conns:
            client.close()
        await trio.testing.wait_all_tasks_blocked()
        assert all(res == [False] for res in results)
        assert len(loop) == 0
        nursery.cancel_scope.cancel()
    for _, conn in conns:
        conn.sock.close()


async def test_a_handed_back_connection_leaves_the_epoll_until_it_parks_again():
    loop = ReadyLoop()
    [(client, conn)] = pairs(1)
    async with trio.open_nursery() as nursery:
        await nursery.start(loop.run)
        client.send(b"abc!")
        assert await loop.park(conn) == b"abc!"
        assert len(loop) == 0
        # not parked: the loop does not read it, the bytes wait in the socket
        client.send(b"later")
        await trio.testing.wait_all_tasks_blocked()
        assert conn.calls == 1
        client.send(b"!")
        assert await loop.park(conn) == b"later!"
        nursery.cancel_scope.cancel()
    client.close()
    conn.sock.close()


async def test_an_exception_in_one_fast_path_is_raised_in_its_own_task_only():
    loop = ReadyLoop()
    (bad_client, bad), (good_client, good) = pairs(2)
    good_results: list = []
    raised = []

    async def bad_task():
        with pytest.raises(ValueError, match="bad byte") as info:
            await loop.park(bad)
        raised.append(info.value)

    async with trio.open_nursery() as nursery:
        await nursery.start(loop.run)
        nursery.start_soon(bad_task)
        nursery.start_soon(park_until_handed, loop, good, good_results)
        await trio.testing.wait_all_tasks_blocked()
        bad_client.send(b"?")
        good_client.send(b"fine")
        await trio.testing.wait_all_tasks_blocked()
        assert len(raised) == 1 and not loop.closed and len(loop) == 1
        good_client.send(b"!")
        await trio.testing.wait_all_tasks_blocked()
        assert good_results == [b"fine!"]
        nursery.cancel_scope.cancel()
    for s in (bad_client, good_client, bad.sock, good.sock):
        s.close()


async def test_a_parked_task_cancels_like_a_wait_and_its_fd_can_be_reused():
    loop = ReadyLoop()
    [(client, conn)] = pairs(1)
    async with trio.open_nursery() as nursery:
        await nursery.start(loop.run)
        with trio.move_on_after(0.01) as scope:
            await loop.park(conn)
        assert scope.cancelled_caught
        assert len(loop) == 0
        # out of the epoll: closing the socket and reusing its number is safe
        fd = conn.sock.fileno()
        conn.sock.close()
        client.close()
        client2, sock2 = socket.socketpair()
        other = None
        if sock2.fileno() != fd:         # the kernel hands out the lowest free number: the pair's
            other, (client2, sock2) = (client2, sock2), socket.socketpair()
        conn2 = Conn(sock2)
        client2.send(b"again!")
        assert await loop.park(conn2) == b"again!"
        nursery.cancel_scope.cancel()
    for s in (client2, sock2, *(other or ())):
        s.close()


async def test_a_stopping_loop_hands_its_parked_tasks_resume_and_refuses_new_parks():
    loop = ReadyLoop()
    conns = pairs(3)
    results: list[list] = [[] for _ in conns]
    async with trio.open_nursery() as outer:
        async with trio.open_nursery() as nursery:
            await nursery.start(loop.run)
            for (_, conn), res in zip(conns, results, strict=True):
                outer.start_soon(park_until_handed, loop, conn, res)
            await trio.testing.wait_all_tasks_blocked()
            assert len(loop) == 3
            nursery.cancel_scope.cancel()
    assert results == [[RESUME]] * 3
    assert loop.closed
    with pytest.raises(trio.ClosedResourceError):
        await loop.park(conns[0][1])
    for client, conn in conns:
        client.close()
        conn.sock.close()


async def test_a_pass_serves_at_most_max_events_then_lets_other_tasks_run():
    loop = ReadyLoop(max_events=4)
    conns = pairs(10)
    order: list[str] = []

    class Logged(Conn):
        def on_ready(self, now: float) -> object:
            order.append("conn")
            return super().on_ready(now)

    logged = [Logged(conn.sock) for _, conn in conns]

    async def other_task():
        # runnable throughout: it must get turns between the loop's passes
        while True:
            order.append("other")
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        await nursery.start(loop.run)
        for conn in logged:
            nursery.start_soon(park_until_handed, loop, conn, [])
        await trio.testing.wait_all_tasks_blocked()
        for client, _ in conns:
            client.send(b"x")
        nursery.start_soon(other_task)
        with trio.fail_after(5):
            while sum(c.calls for c in logged) < 10:
                await trio.lowlevel.checkpoint()
        runs = "".join("c" if o == "conn" else "o" for o in order)
        # 10 ready sockets in passes of at most 4, and the other task ran
        # before the last one (trio may run the loop's next pass first in
        # its next batch, so two passes can be adjacent)
        assert loop.passes == 3 and runs.count("c") == 10
        assert runs.index("o") < runs.rindex("c")
        nursery.cancel_scope.cancel()
    for client, conn in conns:
        client.close()
        conn.sock.close()


async def test_a_fast_path_that_cancels_its_own_parked_task_does_not_break_the_loop():
    """A fast path may close its own connection (a write that finds the peer
    gone cancels the session) and still return something to hand back: the
    cancel has already woken the task, so the loop must not wake it again,
    and it goes on serving the others."""
    loop = ReadyLoop()
    (a_client, a_conn), (b_client, b_conn) = pairs(2)
    b_results: list = []
    a_cancelled = []

    class Closing(Conn):
        def on_ready(self, now: float) -> object:
            super().on_ready(now)
            scope.cancel()           # as session.close from inside the fast path
            return "handed back after the close"

    closing = Closing(a_conn.sock)

    async def a_task() -> None:
        nonlocal scope
        with trio.CancelScope() as scope:
            await loop.park(closing)
        a_cancelled.append(scope.cancelled_caught)

    scope = trio.CancelScope()
    async with trio.open_nursery() as nursery:
        await nursery.start(loop.run)
        nursery.start_soon(a_task)
        nursery.start_soon(park_until_handed, loop, b_conn, b_results)
        await trio.testing.wait_all_tasks_blocked()
        a_client.send(b"x")
        await trio.testing.wait_all_tasks_blocked()
        assert a_cancelled == [True] and len(loop) == 1
        b_client.send(b"still served!")
        with trio.fail_after(5):
            while not b_results:
                await trio.sleep(0.01)
        assert b_results == [b"still served!"]
        nursery.cancel_scope.cancel()
    for client, conn in ((a_client, a_conn), (b_client, b_conn)):
        client.close()
        conn.sock.close()


async def test_a_failing_durable_poll_is_logged_and_the_loop_serves_on(caplog):
    calls = []

    def poll_durable():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("poll bug")

    loop = ReadyLoop(poll_durable)
    [(client, conn)] = pairs(1)
    results: list = []
    async with trio.open_nursery() as nursery:
        await nursery.start(loop.run)
        nursery.start_soon(park_until_handed, loop, conn, results)
        await trio.testing.wait_all_tasks_blocked()
        client.send(b"one")
        await trio.testing.wait_all_tasks_blocked()
        assert calls == [1] and not loop.closed
        client.send(b"two!")
        await trio.testing.wait_all_tasks_blocked()
        assert results == [b"onetwo!"] and len(calls) == 2
        nursery.cancel_scope.cancel()
    assert "poll bug" in caplog.text
    client.close()
    conn.sock.close()
