"""What one connection owes its peer, sent in order by one writer task.

MQTT acks that the socket did not take at once, and the seq acks of a
``/v1/ws`` device, wait here: the session ``put``s without waiting, and a
single writer task, started with the first item (most connections never need
one), sends everything queued in one call of ``send``. ``size`` and ``len``
let the session stop reading a peer that does not read its acks;
``wait_sent`` lets it flush before closing.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable, Sized
from typing import Any, Generic, Protocol, TypeVar

import trio

__all__ = ["Outgoing", "OwesAcks", "wait_acks_sent"]

T = TypeVar("T", bound=Sized)


class Outgoing(Generic[T]):
    __slots__ = ("_send", "_items", "_in_flight", "size", "busy", "_ready", "_sent")

    def __init__(self, send: Callable[[list[T]], Awaitable[None]],
                 start_soon: Callable[[Callable[[], Awaitable[Any]]], None]) -> None:
        """``send`` writes a batch of items to the peer, in order; ``start_soon``
        starts the writer task (a nursery's, or the connection's SideTasks)."""
        self._send = send
        self._items: list[T] = []
        self._in_flight = 0
        self.size = 0           # total len() of the items queued, not counting a batch being sent
        self.busy = False       # the writer is inside send
        self._ready: trio.Event | None = None
        self._sent: trio.Event | None = None
        start_soon(self._run)

    def __len__(self) -> int:
        """Items owed: queued, or being sent now."""
        return len(self._items) + self._in_flight

    @property
    def idle(self) -> bool:
        """Nothing queued and nothing being sent."""
        return not self._items and not self.busy

    def put(self, item: T) -> None:
        self._items.append(item)
        self.size += len(item)
        if self._ready is not None:
            self._ready.set()

    async def wait_sent(self) -> None:
        """Until everything queued so far, and anything queued meanwhile, is sent."""
        while not self.idle:
            if self._sent is None or self._sent.is_set():
                self._sent = trio.Event()
            await self._sent.wait()

    async def _run(self) -> None:
        while True:
            while not self._items:
                self._ready = trio.Event()
                await self._ready.wait()
            items, self._items = self._items, []
            self.size = 0
            self._in_flight = len(items)
            self.busy = True
            try:
                await self._send(items)
            finally:
                self.busy = False
                self._in_flight = 0
            if self._sent is not None:
                self._sent.set()


class OwesAcks(Protocol):
    """A session that owes its peer acks: ``pending`` readings submitted whose
    acks are not queued yet (it sets ``acks_done``, when there is one, as
    ``pending`` reaches 0), and the ``out`` queue the acks go through."""

    pending: int
    acks_done: trio.Event | None

    @property
    def out(self) -> Outgoing[Any] | None: ...


async def wait_acks_sent(owner: OwesAcks) -> None:
    """Until every submitted reading is acked and the acks are sent (a graceful
    stop's last duty to a connection)."""
    while True:
        while owner.pending:
            owner.acks_done = trio.Event()
            await owner.acks_done.wait()
        out = owner.out
        if out is None or out.idle:
            return
        await out.wait_sent()
