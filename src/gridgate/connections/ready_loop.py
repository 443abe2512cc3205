"""One task that serves every ready connection socket of a kind from a
shared epoll: the "ready loop".

Why: a parked connection task woken by Trio costs, per reading, an
``epoll_ctl`` (Trio's registrations are one-shot and re-armed on every
wait) and a whole scheduler step (reschedule, run the task, send the
wake-up through its coroutine frames). In the fleet shape (1,000 devices
x 1 reading in flight) that was about half of the event loop's CPU. Here
the connection's fd is registered once, level-triggered, in an epoll the
loop owns; the loop is woken once per batch of ready sockets and runs each
one's synchronous fast path inline (read, decode, validate, queue for the
batcher): no task switch and no ``epoll_ctl`` per reading.

The connection's own task stays (one task per device socket is the
design) and still owns everything that has to wait: it parks under one
small object (``_Park``: the awaitable and the abort function at once, as
``fdwait._ReadableWait``) while the loop owns the fd. When the fast path
has something that needs ``await`` (backpressure, a quota pause, a close,
an exception) it returns it; the loop takes the fd out of its epoll and
reschedules the task with that value (or raises the exception in it),
and the task parks again when done. Cancelling a parked task (a close,
the reaper, a takeover, graceful drain, gateway stop) takes the fd out of
the epoll: it behaves as a cancelled ``wait_readable``.

It relies on the same trio internals as ``fdwait`` (``WaitTaskRescheduled``
awaited directly); where those are missing (``AVAILABLE`` False) the
sessions keep their own ``wait_readable`` loop.
"""
from __future__ import annotations

import logging
import select
from collections.abc import Callable
from typing import Any, Protocol

import outcome
import trio

from gridgate.connections import fdwait

__all__ = ["ReadyLoop", "ReadyConnection", "AVAILABLE", "RESUME"]

log = logging.getLogger("gridgate.connections.ready_loop")

AVAILABLE: bool = fdwait.SHALLOW and hasattr(select, "epoll")

# What a parked task gets back when the loop stops with it still parked:
# serve the connection the old way (its own wait_readable).
RESUME = object()

# Ready sockets served per pass before the loop yields to the other tasks:
# the batcher and the writer must run between passes, and one pass of 256
# fast paths is about 2-5 ms of CPU here.
MAX_EVENTS = 256

_EPOLLIN = select.EPOLLIN if hasattr(select, "EPOLLIN") else 1
_current_task = trio.lowlevel.current_task
_reschedule = trio.lowlevel.reschedule
_SUCCEEDED = trio.lowlevel.Abort.SUCCEEDED
_Value = outcome.Value
_Error = outcome.Error


class ReadyConnection(Protocol):
    """What the loop needs of a connection."""

    def ready_fd(self) -> int:
        """The socket's fd (level-triggered EPOLLIN is registered for it)."""

    def on_ready(self, now: float) -> object:
        """The fast path, run by the loop when the socket is readable, with
        ``trio.current_time()`` of this pass. None: done, stay parked;
        anything else: hand that to the connection's task (its park
        returns it). An exception is raised in the connection's task."""


class _Park(fdwait.Parked):
    """One park of one connection's task while the loop owns its fd; trio
    calls it to abort."""

    __slots__ = ("_loop", "conn", "task")

    def __init__(self, loop: ReadyLoop, conn: ReadyConnection) -> None:
        self._loop = loop
        self.conn = conn
        self.task: Any = None

    def __next__(self) -> Any:
        loop = self._loop
        fd = self.conn.ready_fd()
        if loop.closed:
            raise trio.ClosedResourceError("the ready loop has stopped")
        try:
            loop._epoll.register(fd, _EPOLLIN)
        except FileExistsError:
            # a registration left behind by an fd closed and reused while
            # parked (not expected: sockets close after their task unparks)
            loop._epoll.modify(fd, _EPOLLIN)
        self.task = _current_task()
        loop._parked[fd] = self
        return fdwait._WaitTaskRescheduled(self)

    def __call__(self, _raise_cancel: Any) -> trio.lowlevel.Abort:
        # cancelled while parked: the fd leaves the loop, then the
        # cancellation is delivered (as for a cancelled wait_readable)
        self._loop._unpark(self.conn.ready_fd(), self)
        return _SUCCEEDED


class ReadyLoop:
    """The loop: ``await nursery.start(loop.run)`` once per gateway run;
    connections ``await loop.park(conn)`` while it is running."""

    def __init__(self, poll_durable: Callable[[], None] = lambda: None, max_events: int = MAX_EVENTS) -> None:
        self._epoll = select.epoll()
        self._parked: dict[int, _Park] = {}
        self._poll_durable = poll_durable
        self._max_events = max_events
        # True before run starts and after it ends: parks are refused then
        self.closed = True
        self.passes = 0               # plain counters for tests and profiles
        self.served = 0
        self.handed_back = 0

    def __len__(self) -> int:
        return len(self._parked)

    def park(self, conn: ReadyConnection) -> _Park:
        """Park the calling task until ``conn``'s fast path hands it
        something (``await`` it at once): returns that, or RESUME if the
        loop stops first. Raises ClosedResourceError if the loop is not
        running (check ``closed`` first)."""
        return _Park(self, conn)

    def _unpark(self, fd: int, park: _Park) -> bool:
        if self._parked.get(fd) is not park:
            return False
        del self._parked[fd]
        try:
            self._epoll.unregister(fd)
        except (FileNotFoundError, OSError, ValueError):
            pass            # closed meanwhile (the kernel dropped it) or the epoll is closed
        return True

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        epfd = self._epoll.fileno()
        poll = self._epoll.poll
        max_events = self._max_events
        self.closed = False
        task_status.started()
        try:
            while True:
                await fdwait.wait_readable(epfd)
                while True:
                    events = poll(0, max_events)
                    if events:
                        self._serve(events)
                        try:
                            self._poll_durable()
                        except Exception:
                            # a bug there must not stop every connection's reads
                            # (a session calling it would have lost only itself)
                            log.exception("poll_durable failed in the ready loop")
                    if len(events) < max_events:
                        break
                    # more may be ready: let the batcher and others run first
                    await trio.lowlevel.checkpoint()
        finally:
            self.closed = True
            parked, self._parked = self._parked, {}
            for park in parked.values():
                _reschedule(park.task, _Value(RESUME))
            self._epoll.close()

    def _serve(self, events: list[tuple[int, int]]) -> None:
        parked = self._parked
        now = trio.current_time()
        self.passes += 1
        self.served += len(events)
        for fd, _ in events:
            park = parked.get(fd)
            if park is None:
                # not ours any more (cannot happen: parks and unparks keep
                # the two in step); never spin on it
                try:
                    self._epoll.unregister(fd)
                except OSError:
                    pass
                continue
            try:
                got = park.conn.on_ready(now)
                if got is None:
                    continue
                result: Any = _Value(got)
            except Exception as exc:        # that connection's, raised in its own task
                result = _Error(exc)
            if not self._unpark(fd, park):
                # the fast path closed its own connection (a write that found
                # the peer gone): the cancel has already woken the task, and
                # waking it twice would break the loop for every connection
                if type(result) is _Error:
                    log.error("fast path of a connection closed meanwhile failed", exc_info=result.error)
                continue
            self.handed_back += 1
            _reschedule(park.task, result)
