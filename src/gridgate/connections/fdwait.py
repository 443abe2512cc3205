"""Wait for a socket to turn readable under one small object instead of
five coroutine frames.

An idle device connection spends its whole life parked in one wait for
its socket, and at 15,000 connections every object on that parked stack
costs its size in RSS 15,000 times. ``trio.lowlevel.wait_readable`` parks
a task under five frames (the generated ``wait_readable``, the IO
manager's ``wait_readable`` and ``_epoll_wait``, ``wait_task_rescheduled``
and ``_async_yield``) plus an abort closure: about 1.4 KiB per connection
measured with tracemalloc. ``wait_readable`` here does what trio's
``_epoll_wait`` does, with one 48-byte object that is at once the awaited
iterator and the abort function: same registration in trio's epoll
registry, same wake-up, same cancellation, same ``BusyResourceError`` and
``ClosedResourceError`` (``notify_closing``).

It relies on internals of trio's epoll IO manager (its ``_registered``
table of ``EpollWaiters`` and ``_update_registrations``), checked at
import and on every call: with another IO manager (kqueue, Windows, a
trio that changed them) it is ``trio.lowlevel.wait_readable`` itself.
"""
from __future__ import annotations

from collections.abc import Awaitable, Generator
from typing import Any

import trio

__all__ = ["wait_readable", "SHALLOW", "Parked"]

# trio's internals this module mirrors; None (and SHALLOW False) where
# they are not as expected
_EpollIOManager: Any = None
_EpollWaiters: Any = None
_run_context: Any = None
_WaitTaskRescheduled: Any = None
try:
    from trio._core import _io_epoll, _run, _traps
except ImportError:          # pragma: no cover - another platform or trio
    pass
else:
    _EpollIOManager = getattr(_io_epoll, "EpollIOManager", None)
    _EpollWaiters = getattr(_io_epoll, "EpollWaiters", None)
    _run_context = getattr(_run, "GLOBAL_RUN_CONTEXT", None)
    _WaitTaskRescheduled = getattr(_traps, "WaitTaskRescheduled", None)

SHALLOW: bool = (
    _EpollIOManager is not None and _run_context is not None and _WaitTaskRescheduled is not None
    and callable(getattr(_EpollIOManager, "_update_registrations", None))
    and "_registered" in getattr(_EpollIOManager, "__slots__", ())
    and {"read_task", "write_task", "current_flags"}
    <= set(getattr(_EpollWaiters, "__slots__", ()))
)

_current_task = trio.lowlevel.current_task
_SUCCEEDED = trio.lowlevel.Abort.SUCCEEDED


class Parked:
    """A one-object park of the awaiting task: ``await`` drives it as an
    iterator (a subclass's ``__next__`` registers and returns trio's
    ``WaitTaskRescheduled`` with itself as the abort function, ``send``
    receives the wake-up outcome), so the parked stack holds this object
    instead of trio's frames and abort closure. Awaited once."""

    __slots__ = ()

    def __await__(self) -> Generator[Any, Any, Any]:
        return self         # type: ignore[return-value]

    def send(self, result: Any) -> Any:
        # trio sends the outcome it was rescheduled with: a value, or an
        # Error (notify_closing, a failed registration, a cancel)
        raise StopIteration(result.unwrap())

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        if val is None:
            raise typ
        raise val


class _ReadableWait(Parked):
    """One park of one task on one fd; trio calls it to abort the wait."""

    # Two slots: 48 bytes (a third would round up to 64). Awaited once, by
    # ``await wait_readable(fd)`` only, so it keeps no "already parked" flag.
    __slots__ = ("_io", "_fd")

    def __init__(self, io: Any, fd: int) -> None:
        self._io = io
        self._fd = fd

    def __next__(self) -> Any:
        io = self._io
        waiters = io._registered[self._fd]
        if waiters.read_task is not None:
            raise trio.BusyResourceError("another task is already reading / writing this fd")
        waiters.read_task = _current_task()
        io._update_registrations(self._fd)
        return _WaitTaskRescheduled(self)

    def __call__(self, _raise_cancel: Any) -> trio.lowlevel.Abort:
        # trio's abort for _epoll_wait: drop the registration, then let the
        # cancellation be delivered
        io = self._io
        io._registered[self._fd].read_task = None
        io._update_registrations(self._fd)
        return _SUCCEEDED


def wait_readable(fd: int) -> Awaitable[None]:
    """``trio.lowlevel.wait_readable(fd)`` for an int fd; ``await`` it at once.

    A plain function returning the awaitable, so that it adds no frame of
    its own to the parked stack."""
    if SHALLOW:
        io = _run_context.runner.io_manager
        if type(io) is _EpollIOManager:
            return _ReadableWait(io, fd)
    return trio.lowlevel.wait_readable(fd)  # noqa: ASYNC105 - returned for the caller to await at once
