"""The cluster's NATS connection, seen from Trio.

Core NATS (no JetStream): cluster messages are about who holds a device
right now; nothing is stored, and a question that gets no answer is
answered as such (``gridgate.cluster.node``), never replayed.
The nats-py client runs on an asyncio loop thread (``AsyncioThread``);
subscription handlers run on the Trio thread, one ``run_sync_soon`` per
message, and must not block: they do their work at once or start a task.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import nats
import nats.errors
import trio
from nats.aio.client import Client as NATSClient

from gridgate.asyncio_thread import AsyncioThread, LoopClosed

__all__ = ["Bus", "BusMessage", "BusError"]

log = logging.getLogger("gridgate.cluster")


class BusError(Exception):
    """NATS is not reachable, or a request found nobody to answer it."""


@dataclass(frozen=True, slots=True)
class BusMessage:
    subject: str
    data: bytes
    reply: str


Handler = Callable[[BusMessage], None]


class Bus:
    """One NATS connection for the cluster; reconnects forever once connected."""

    def __init__(self, servers: Sequence[str], name: str, *, connect_timeout_s: float = 10.0,
                 reconnect_wait_s: float = 0.5) -> None:
        self.servers = list(servers)
        self.name = name
        self.connect_timeout_s = connect_timeout_s
        self.reconnect_wait_s = reconnect_wait_s
        self._thread = AsyncioThread(f"gridgate-cluster-{name}")
        self._nc: Any = None
        self._token: trio.lowlevel.TrioToken | None = None
        # called on the Trio thread after the client reconnected (messages may have been lost meanwhile)
        self.on_reconnect: Callable[[], None] | None = None
        self.publish_errors = 0
        self._logged: set[str] = set()

    # -- lifecycle ------------------------------------------------------------

    async def connect(self) -> None:
        """Connect to one of ``servers``.

        Raises:
            BusError: no server answered within ``connect_timeout_s``.
        """
        self._token = trio.lowlevel.current_trio_token()
        self._thread.start()
        try:
            await self._thread.call(self._async_connect())
        except BaseException:
            await self._thread.stop()
            raise

    async def _async_connect(self) -> None:
        nc = NATSClient()
        try:
            await asyncio.wait_for(nc.connect(
                servers=self.servers, name=self.name,
                connect_timeout=min(2.0, self.connect_timeout_s),  # type: ignore[arg-type]
                allow_reconnect=True, max_reconnect_attempts=-1,   # a node never leaves its cluster on its own
                reconnect_time_wait=self.reconnect_wait_s,  # type: ignore[arg-type]
                error_cb=self._error_cb, reconnected_cb=self._reconnected_cb,
            ), timeout=self.connect_timeout_s)
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            try:
                await nc.close()
            except Exception:
                pass
            raise BusError(f"cannot connect to NATS at {', '.join(self.servers)} within "
                           f"{self.connect_timeout_s:g}s: {type(exc).__name__}: {exc}") from exc
        self._nc = nc

    async def _error_cb(self, exc: Exception) -> None:
        # a server down is retried every reconnect_wait_s: each distinct error once per outage
        key = f"{type(exc).__name__}: {exc}"
        if key not in self._logged:
            self._logged.add(key)
            log.warning("cluster nats: %s", key)

    async def _reconnected_cb(self) -> None:
        self._logged.clear()
        url = self._nc.connected_url if self._nc is not None else None
        log.info("cluster nats: reconnected to %s", url.netloc if url else "?")
        self._to_trio(self._reconnected)

    def _reconnected(self) -> None:
        if self.on_reconnect is not None:
            self.on_reconnect()

    async def aclose(self) -> None:
        """Send what is buffered, close the connection and stop the loop thread."""
        nc, self._nc = self._nc, None
        if nc is not None and self._thread.running:
            try:
                with trio.move_on_after(5):
                    await self._thread.call(self._async_close(nc))
            except (LoopClosed, BusError):
                pass
        await self._thread.stop()

    @staticmethod
    async def _async_close(nc: Any) -> None:
        try:
            await asyncio.wait_for(nc.flush(), 2.0)
        except Exception:
            pass
        await nc.close()

    # -- messages ---------------------------------------------------------------

    def _to_trio(self, fn: Callable[..., None], *args: Any) -> None:
        token = self._token
        if token is None:
            return
        try:
            token.run_sync_soon(fn, *args)
        except trio.RunFinishedError:
            pass

    def publish(self, subject: str, data: bytes, reply: str = "") -> None:
        """Send without waiting. While NATS is unreachable the client buffers
        (bounded by nats-py's pending size); what it cannot take is counted
        in ``publish_errors`` and logged once: the next sync repairs it."""
        nc = self._nc
        if nc is None or not self._thread.soon(self._publish_soon, nc, subject, data, reply):
            self.publish_errors += 1

    def _publish_soon(self, nc: Any, subject: str, data: bytes, reply: str) -> None:
        task = asyncio.ensure_future(nc.publish(subject, data, reply=reply))
        task.add_done_callback(self._published)

    def _published(self, task: asyncio.Future[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self.publish_errors += 1
            key = f"publish: {type(exc).__name__}: {exc}"
            if key not in self._logged:
                self._logged.add(key)
                log.warning("cluster nats: %s", key)

    async def subscribe(self, subject: str, handler: Handler) -> None:
        """Call ``handler`` on the Trio thread for every message on ``subject``."""
        def deliver(msg: Any) -> None:
            self._to_trio(handler, BusMessage(msg.subject, msg.data, msg.reply or ""))

        async def cb(msg: Any) -> None:
            deliver(msg)

        await self._call(self._nc.subscribe(subject, cb=cb))

    async def gather(self, subject: str, data: bytes, timeout_s: float, want: int,
                     enough: Callable[[bytes], bool] | None = None) -> list[bytes]:
        """The answers of every listener on ``subject``: until ``want`` have
        come, one of them is ``enough``, or ``timeout_s`` passed."""
        got: list[bytes] = await self._call(self._gather(subject, data, timeout_s, want, enough))
        return got

    async def _gather(self, subject: str, data: bytes, timeout_s: float, want: int,
                      enough: Callable[[bytes], bool] | None) -> list[bytes]:
        nc = self._nc
        inbox = nc.new_inbox()
        got: list[bytes] = []
        done = asyncio.Event()

        async def cb(msg: Any) -> None:
            data = bytes(msg.data)
            got.append(data)
            if len(got) >= want or (enough is not None and enough(data)):
                done.set()

        sub = await nc.subscribe(inbox, cb=cb)
        try:
            await nc.publish(subject, data, reply=inbox)
            try:
                await asyncio.wait_for(done.wait(), timeout_s)
            except TimeoutError:
                pass
        finally:
            await sub.unsubscribe()
        return list(got)

    async def _call(self, coro: Any) -> Any:
        if self._nc is None:
            coro.close()
            raise BusError("the cluster's NATS connection is not open")
        try:
            return await self._thread.call(coro)
        except LoopClosed as exc:
            raise BusError(str(exc)) from None
        except (OSError, nats.errors.ConnectionClosedError, nats.errors.OutboundBufferLimitError) as exc:
            raise BusError(f"{type(exc).__name__}: {exc}") from None
