"""Extra tasks of one connection, run in the gateway's connection nursery.

A nursery per connection costs about 1.3 KiB on every idle connection (its
cancel scope's CancelStatus holds two sets, plus the children set), and most
device connections never need a second task: their acks and answers go
straight into the socket. ``SideTasks`` starts the rare second task (an ack
writer for a client that stopped reading, a downlink command sender) in the
gateway's long-lived connection nursery, each inside its own cancel scope,
and the connection cancels them all when it ends. A side task's
failure closes its own connection and is logged; it never reaches the shared
nursery.
"""
from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVarTuple

import trio

if TYPE_CHECKING:
    from gridgate.connections.manager import Session

__all__ = ["SideTasks"]

log = logging.getLogger("gridgate.connections")

Ts = TypeVarTuple("Ts")


class SideTasks:
    """Quacks like ``trio.Nursery.start_soon`` for the code that starts
    per-connection helpers (``gridgate.downlink.commands.DownlinkChannel``)."""

    __slots__ = ("_nursery", "_session", "_scopes", "_cancelled")

    def __init__(self, nursery: trio.Nursery, session: Session) -> None:
        self._nursery = nursery
        self._session = session
        self._scopes: set[trio.CancelScope] = set()
        self._cancelled = False

    def start_soon(self, async_fn: Callable[[*Ts], Awaitable[object]], *args: *Ts) -> None:
        self._nursery.start_soon(self._guard, async_fn, args)

    def cancel(self) -> None:
        """End every side task, also those started later (the connection is
        over); idempotent."""
        self._cancelled = True
        for scope in self._scopes:
            scope.cancel()

    async def _guard(self, async_fn: Callable[[*Ts], Awaitable[object]], args: tuple[*Ts]) -> None:
        session = self._session
        scope = trio.CancelScope()
        if self._cancelled:
            scope.cancel()
        self._scopes.add(scope)
        try:
            with scope:
                await async_fn(*args)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            session.close("peer stopped reading")
        except Exception:
            log.exception("error in a helper task of %r; closing that connection", session)
            session.close("internal error")
        finally:
            self._scopes.discard(scope)
