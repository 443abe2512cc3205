"""Durable-timeout deadlines of HTTP telemetry requests, kept by one task.

A request waits for its group commit at most ``[http] durable_timeout_s``
and is then answered 503. A ``trio.move_on_after`` per request costs a
cancel scope and a deadline-heap entry each: about 12% of the fast engine's
CPU under wrk with one request per connection in flight (py-spy). Every
request gets the same timeout, so deadlines arrive in order: a deque and one
task that wakes for the oldest do the same for all of them.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Protocol

import trio

__all__ = ["DurableTimeouts"]


class _Done(Protocol):
    def is_set(self) -> bool: ...


class _Expirable(Protocol):
    @property
    def done(self) -> _Done: ...

    def expire(self) -> None: ...


class DurableTimeouts:
    # Done entries leave the deque when the sweeper next wakes; waking at
    # least this often keeps them from piling up for the whole timeout. Each
    # holds its tuple, Pending and Done until then: at 0.1 s, under wrk with
    # 1,000 connections (about 50k requests/s), that was some 5,000 answered
    # requests, about 2 KiB of RSS per connection; at 0.02 s it is a fifth,
    # for 50 wake-ups a second while requests wait.
    SWEEP_S = 0.02

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._waiting: deque[tuple[float, _Expirable]] = deque()
        self._added = trio.Event()
        # add() runs once per HTTP telemetry request: while run() runs, it reads
        # the run's clock itself (a MockClock in tests), without the two
        # wrappers of trio.current_time() (about 270 -> 110 ns here)
        self._now: Callable[[], float] = trio.current_time

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, pending: _Expirable) -> None:
        """Expire ``pending`` (``expire()`` sets its ``done``) unless it is done within the timeout."""
        self._waiting.append((self._now() + self.timeout_s, pending))
        if len(self._waiting) == 1:
            self._added.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._now = trio.lowlevel.current_clock().current_time
        task_status.started()
        waiting = self._waiting
        try:
            while True:
                now = trio.current_time()
                while waiting and (waiting[0][1].done.is_set() or waiting[0][0] <= now):
                    _, pending = waiting.popleft()
                    if not pending.done.is_set():
                        pending.expire()
                if not waiting:
                    self._added = trio.Event()
                    await self._added.wait()
                    continue
                await trio.sleep_until(min(waiting[0][0], now + self.SWEEP_S))
        finally:
            self._now = trio.current_time       # not a finished run's clock
