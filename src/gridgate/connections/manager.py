"""The registry of live sessions, the heartbeat reaper and session takeover.

Liveness is a plain ``last_seen`` float per session, written by the session
on every read. One reaper task scans it: every ``reap_interval_s`` it drops
sessions silent for ``idle_timeout_s`` (the seed's 30 s ticker / 5 min rule),
and it also wakes exactly at the earliest MQTT keepalive deadline
(1.5 x keepalive, MQTT 3.1.1 section 3.1.2.10) kept in a heap. No cancel-scope
deadline is moved per packet: that would cost a scheduler operation per read.
"""
from __future__ import annotations

import heapq
import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

import trio

if TYPE_CHECKING:
    from gridgate.observability.metrics import Metrics

__all__ = ["Session", "ConnManager", "DeviceObserver"]

log = logging.getLogger("gridgate.connections")

_ids = itertools.count(1)


class Session:
    """One device connection, whatever its protocol.

    The protocol handler owns the socket; the manager only reads ``last_seen``
    and ``paused`` and may ``close(reason)`` it, which cancels the handler's
    scope.
    """

    __slots__ = (
        "id", "protocol", "remote", "device_id", "connected_at", "last_seen", "paused",
        "keepalive_timeout", "cancel_scope", "_read_scope", "drain_deadline", "close_reason", "connected_wall",
        "_heap_due", "send_command", "identity", "__weakref__",
    )

    def __init__(self, protocol: str, remote: str, cancel_scope: trio.CancelScope) -> None:
        self.id: int = next(_ids)
        self.protocol = protocol
        self.remote = remote
        self.device_id: str | None = None
        now = trio.current_time()
        self.connected_at = now
        self.last_seen = now
        # True while the session waits on backpressure (a full pipeline or an
        # unsent ack buffer): such a session is slowed by us, not silent.
        self.paused = False
        self.keepalive_timeout: float = 0.0      # 0 = none (MQTT keepalive 0)
        self.cancel_scope = cancel_scope
        # Graceful shutdown (stop_reading): made on first use, because an
        # entered cancel scope costs ~0.5 KiB per idle connection.
        self._read_scope: trio.CancelScope | None = None
        # Set by stop_reading: owed acks may still go out until then.
        self.drain_deadline: float | None = None
        self.connected_wall = time.time()
        self.close_reason: str | None = None
        self._heap_due: float | None = None
        # Registered by a protocol handler that can carry downlink commands
        # (the downlink stage): takes its command, opaque here, returns False when the
        # connection's command queue is full. None: no downlink here.
        self.send_command: Callable[[Any], bool] | None = None
        # Who the connection authenticated as (a gridgate.security Identity,
        # opaque here), set by a protocol session that authenticates once per
        # connection; a credentials reload closes it when that identity is gone.
        # None: not authenticated that way (no credential store, or HTTP, which
        # authenticates every request).
        self.identity: Any = None

    @property
    def read_scope(self) -> trio.CancelScope:
        """A handler that reads inside this scope is stopped by ``stop_reading``
        by cancelling just it, and can then still send what it owes."""
        if self._read_scope is None:
            self._read_scope = trio.CancelScope()
        return self._read_scope

    def stop_reading(self, deadline: float) -> None:
        """Graceful shutdown: stop reading this connection; owed acks may
        still be delivered until ``deadline``. A handler not inside
        ``read_scope`` (the MQTT session) gets its whole scope cancelled and
        sees ``drain_deadline`` set when it catches the Cancelled."""
        self.drain_deadline = deadline
        if self._read_scope is not None:
            self._read_scope.cancel()
        else:
            if self.close_reason is None:
                self.close_reason = "gateway shutting down"
            self.cancel_scope.cancel()

    def close(self, reason: str) -> None:
        if self.close_reason is None:
            self.close_reason = reason
        self.cancel_scope.cancel()

    def __repr__(self) -> str:
        return f"<Session {self.id} {self.protocol} {self.device_id or '-'} {self.remote}>"


class DeviceObserver(Protocol):
    """Told when a device gets or loses its session here (the cluster node,
    gridgate.cluster.node, announces it to the other nodes). Called on the
    Trio thread from inside the registry: must not block or raise."""

    def device_bound(self, session: Session) -> None: ...

    def device_unbound(self, session: Session) -> None: ...


class ConnManager:
    """Knows every live session by id and by device id."""

    def __init__(self, *, idle_timeout_s: float, reap_interval_s: float, max_connections: int,
                 metrics: Metrics) -> None:
        self.idle_timeout_s = idle_timeout_s
        self.reap_interval_s = reap_interval_s
        self.max_connections = max_connections
        self.metrics = metrics
        self._sessions: dict[int, Session] = {}
        self._by_device: dict[str, Session] = {}
        self._by_protocol: dict[str, int] = {}
        self._heap: list[tuple[float, int, Session]] = []
        self._timeouts: dict[float, float] = {}
        # Devices seen since start (for GET /v1/devices/{id}), most recent last;
        # bounded so a churn of device ids cannot grow memory.
        self._seen: OrderedDict[str, dict[str, object]] = OrderedDict()
        self._wakeup = trio.Event()
        self._empty = trio.Event()
        self._next_reap: float | None = None
        # wall-clock epoch offsets for reporting connected_at / last_seen
        self.reaped = 0
        self.taken_over = 0
        # None on a lone gateway; the cluster node when there is a cluster
        self.observer: DeviceObserver | None = None

    # -- registry ---------------------------------------------------------

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._sessions.values()))

    def full(self) -> bool:
        return len(self._sessions) >= self.max_connections

    def by_protocol(self) -> dict[str, int]:
        return {k: v for k, v in self._by_protocol.items() if v}

    def get_device(self, device_id: str) -> Session | None:
        return self._by_device.get(device_id)

    def set_protocol(self, session: Session, protocol: str) -> None:
        """Rename a live session's protocol (a WebSocket upgrade to /mqtt
        becomes "mqtt-ws"), keeping the per-protocol counts right."""
        if session.id not in self._sessions or session.protocol == protocol:
            session.protocol = protocol
            return
        self._by_protocol[session.protocol] -= 1
        self.metrics.connections.labels(session.protocol).dec()
        session.protocol = protocol
        self._by_protocol[protocol] = self._by_protocol.get(protocol, 0) + 1
        self.metrics.connections.labels(protocol).inc()

    def register(self, session: Session) -> None:
        self._sessions[session.id] = session
        self._by_protocol[session.protocol] = self._by_protocol.get(session.protocol, 0) + 1
        self.metrics.connections.labels(session.protocol).inc()
        self.metrics.connections_opened.labels(session.protocol).inc()
        log.debug("connect %s from %s", session.protocol, session.remote)

    def unregister(self, session: Session) -> None:
        if self._sessions.pop(session.id, None) is None:
            return
        self._by_protocol[session.protocol] -= 1
        self.metrics.connections.labels(session.protocol).dec()
        if session.device_id is not None and self._by_device.get(session.device_id) is session:
            del self._by_device[session.device_id]
            self._remember(session)
            if self.observer is not None:
                self.observer.device_unbound(session)
        if not self._sessions:
            self._empty.set()
        log.debug("disconnect %s %s from %s (%s)", session.protocol, session.device_id or "-",
                  session.remote, session.close_reason or "closed")

    SEEN_MAX = 100_000

    def _remember(self, session: Session) -> None:
        assert session.device_id is not None
        self._seen[session.device_id] = self._describe(session)
        self._seen.move_to_end(session.device_id)
        while len(self._seen) > self.SEEN_MAX:
            self._seen.popitem(last=False)

    @staticmethod
    def _describe(session: Session) -> dict[str, object]:
        wall_now = time.time()
        now = trio.current_time()
        return {"device_id": session.device_id, "protocol": session.protocol,
                "connected_at": round(session.connected_wall, 3),
                "last_seen": round(wall_now - (now - session.last_seen), 3), "remote": session.remote}

    def device_info(self, device_id: str) -> dict[str, object] | None:
        """``online`` plus what is known of the device's latest connection; None if never seen."""
        session = self._by_device.get(device_id)
        if session is not None:
            return {"online": True, **self._describe(session)}
        seen = self._seen.get(device_id)
        return None if seen is None else {"online": False, **seen}

    async def wait_empty(self) -> None:
        """Return once no session is left."""
        while self._sessions:
            self._empty = trio.Event()
            await self._empty.wait()

    def bind_device(self, session: Session, device_id: str) -> Session | None:
        """Name the session's device. An older session of the same device is
        closed (takeover, MQTT 3.1.4-2) and returned."""
        old = self._by_device.get(device_id)
        session.device_id = device_id
        self._by_device[device_id] = session
        if self.observer is not None and old is not session:
            self.observer.device_bound(session)
        if old is not None and old is not session:
            self.taken_over += 1
            self.metrics.connections_taken_over.labels(old.protocol).inc()
            log.info("takeover of %s: closing older connection from %s for the new one from %s",
                     device_id, old.remote, session.remote)
            old.close("taken over")
            return old
        return None

    def set_keepalive(self, session: Session, timeout_s: float) -> None:
        """Close the session after ``timeout_s`` of silence (0 = never)."""
        # One float object per distinct timeout, not per session (24 bytes on
        # every connection of a fleet that shares a few keepalives); bounded.
        timeouts = self._timeouts
        timeout_s = timeouts.get(timeout_s, timeout_s)
        if len(timeouts) < 1024:
            timeouts[timeout_s] = timeout_s
        session.keepalive_timeout = timeout_s
        if timeout_s > 0:
            self._schedule(session, session.last_seen + timeout_s)

    def _schedule(self, session: Session, due: float) -> None:
        session._heap_due = due
        heapq.heappush(self._heap, (due, session.id, session))
        if self._next_reap is None or due < self._next_reap:
            self._wakeup.set()

    # -- the reaper ---------------------------------------------------------

    async def run_reaper(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Drop silent sessions until cancelled."""
        next_scan = trio.current_time() + self.reap_interval_s
        task_status.started()
        while True:
            now = trio.current_time()
            if now >= next_scan:
                self._scan_idle(now)
                next_scan = now + self.reap_interval_s
            self._expire_keepalives(now)
            due = next_scan if not self._heap else min(next_scan, self._heap[0][0])
            self._next_reap = due
            self._wakeup = trio.Event()
            with trio.move_on_at(due):
                await self._wakeup.wait()

    def _scan_idle(self, now: float) -> None:
        limit = self.idle_timeout_s
        for session in list(self._sessions.values()):
            if session.paused:
                session.last_seen = now
            elif now - session.last_seen >= limit:
                self._reap(session, "idle", f"silent for {now - session.last_seen:.0f}s (idle_timeout_s={limit:g})")

    def _expire_keepalives(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= now:
            due, _, session = heapq.heappop(heap)
            if session._heap_due != due or session.id not in self._sessions or session.keepalive_timeout <= 0:
                continue  # stale entry
            if session.paused:
                session.last_seen = now
            silent = now - session.last_seen
            if silent >= session.keepalive_timeout:
                self._reap(session, "keepalive",
                           f"no packet for {silent:.1f}s (1.5 x keepalive = {session.keepalive_timeout:g}s)")
            else:
                session._heap_due = session.last_seen + session.keepalive_timeout
                heapq.heappush(heap, (session._heap_due, session.id, session))

    def _reap(self, session: Session, why: str, detail: str) -> None:
        self.reaped += 1
        self.metrics.connections_reaped.labels(why).inc()
        log.info("reaping %s %s from %s: %s", session.protocol, session.device_id or "-", session.remote, detail)
        session.close(f"reaped: {detail}")
