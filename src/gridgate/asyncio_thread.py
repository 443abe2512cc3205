"""An asyncio event loop on its own thread, driven from Trio.

nats-py, the NATS client gridgate uses (a well-kept library, where a
hand-written client would be one more protocol to get right), is asyncio
only; gridgate is Trio. The client lives on a loop in a daemon thread;
Trio code hands it coroutines with ``call`` and awaits their result without
holding a Trio worker thread, and asyncio callbacks reach Trio with
``to_trio`` (the Trio token's run_sync_soon: no thread hop per message
beyond the one the loop already is).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import ctypes.util
import logging
import sys
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import trio

__all__ = ["AsyncioThread", "wait_future", "LoopClosed"]

log = logging.getLogger("gridgate.asyncio")

T = TypeVar("T")


# prctl(PR_SET_NAME): the kernel's name of the calling thread, at most 15 bytes
_PR_SET_NAME = 15
_OS_NAME_MAX = 15


def _set_os_thread_name(name: str) -> None:
    """Name the calling thread in /proc/<pid>/task/<tid>/comm (Linux; else nothing).

    Python's thread names stay inside Python; under the kernel's name the
    loop thread's CPU can be told from the Trio thread's (top -H, py-spy,
    ``python -m bench sinks``, which reports the sink loop's share).
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(_PR_SET_NAME, name.encode("ascii", "replace")[:_OS_NAME_MAX], 0, 0, 0)
    except (OSError, AttributeError):   # no libc or no prctl: the name is only a convenience
        pass


class LoopClosed(RuntimeError):
    """The loop thread is not running (never started, or stopped)."""


async def wait_future(fut: concurrent.futures.Future[T]) -> T:
    """Await a concurrent future from Trio without blocking a worker thread."""
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()

    def wake(_: object) -> None:          # runs on the asyncio thread (or here, if already done)
        try:
            token.run_sync_soon(done.set)
        except trio.RunFinishedError:
            pass

    fut.add_done_callback(wake)
    try:
        await done.wait()
    except BaseException:
        fut.cancel()                      # propagates to the asyncio task
        raise
    return fut.result()


class AsyncioThread:
    """One asyncio loop on one daemon thread, started and stopped from Trio."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def thread(self) -> threading.Thread | None:
        """The loop's thread while started (None before ``start`` and after ``stop``)."""
        return self._thread

    @property
    def running(self) -> bool:
        return (self.loop is not None and not self.loop.is_closed() and self._thread is not None
                and self._thread.is_alive())

    def start(self) -> None:
        loop = asyncio.new_event_loop()

        def run() -> None:
            _set_os_thread_name(self.name)
            asyncio.set_event_loop(loop)
            try:
                loop.run_forever()
            finally:
                try:
                    leftovers = asyncio.all_tasks(loop)
                    for task in leftovers:
                        task.cancel()
                    if leftovers:
                        loop.run_until_complete(asyncio.gather(*leftovers, return_exceptions=True))
                    loop.run_until_complete(loop.shutdown_asyncgens())
                finally:
                    loop.close()

        self.loop = loop
        self._thread = threading.Thread(target=run, name=self.name, daemon=True)
        self._thread.start()

    async def stop(self, timeout_s: float = 10.0) -> None:
        loop, thread = self.loop, self._thread
        if loop is None or thread is None:
            return
        if not loop.is_closed():
            loop.call_soon_threadsafe(loop.stop)
        # The loop stops at its next iteration; the join is short.
        await trio.to_thread.run_sync(thread.join, timeout_s)
        if thread.is_alive():
            log.warning("%s: asyncio loop thread did not stop within %g s", self.name, timeout_s)
        self.loop = self._thread = None

    async def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the loop and await its result from Trio."""
        if not self.running:
            coro.close()
            raise LoopClosed(f"{self.name}: the asyncio loop is not running")
        assert self.loop is not None
        return await wait_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    def soon(self, fn: Callable[..., Any], *args: Any) -> bool:
        """Run ``fn(*args)`` on the loop, without waiting; False if it is not running."""
        loop = self.loop
        if loop is None or loop.is_closed():
            return False
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:              # closed between the check and the call
            return False
        return True
