"""Bans with an expiry, by kind (``client_id`` for flapping, ``address`` for
repeated authentication failures), and the flapping detector that issues
the client-id ones.

Both tables are bounded: a flood of fresh client ids or addresses evicts the
least recently seen entries instead of growing memory.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from gridgate.limits.buckets import BoundedTable

__all__ = ["Ban", "BanList", "FlapDetector"]


@dataclass(frozen=True, slots=True)
class Ban:
    kind: str           # "client_id" | "address"
    key: str
    reason: str         # "flapping" | "auth_failures"
    until: float        # monotonic time (trio.current_time())


class BanList:
    def __init__(self, limit: int = 100_000) -> None:
        self._bans: BoundedTable[tuple[str, str], list[Ban]] = BoundedTable(limit, lambda _key: [])

    def ban(self, kind: str, key: str, reason: str, until: float) -> Ban:
        ban = Ban(kind, key, reason, until)
        self._bans.get((kind, key))[:] = [ban]
        return ban

    def banned(self, kind: str, key: str, now: float) -> Ban | None:
        """The ban in force on ``key``, if any (an expired one is dropped)."""
        held = self._bans.peek((kind, key))
        if not held:
            return None
        if held[0].until <= now:
            self._bans.pop((kind, key))
            return None
        return held[0]

    def lift(self, kind: str, key: str) -> bool:
        return bool(self._bans.pop((kind, key)))

    def active(self, now: float) -> list[Ban]:
        """Bans in force, soonest to expire first."""
        return sorted((b[0] for b in self._bans.values() if b and b[0].until > now), key=lambda b: b.until)


class FlapDetector:
    """More than ``max_connects`` connects of one client id within
    ``window_s`` is a device stuck in a reconnect loop: ban it for ``ban_s``."""

    def __init__(self, bans: BanList, max_connects: int, window_s: float, ban_s: float,
                 limit: int = 100_000) -> None:
        self.bans = bans
        self.max_connects = max_connects
        self.window_s = window_s
        self.ban_s = ban_s
        self._connects: BoundedTable[str, deque[float]] = BoundedTable(limit, lambda _key: deque())

    def connect(self, client_id: str, now: float) -> Ban | None:
        """Record a connect; the ban in force on this id, new or old, if any."""
        if self.ban_s <= 0:
            return None
        ban = self.bans.banned("client_id", client_id, now)
        if ban is not None:
            return ban
        times = self._connects.get(client_id)
        while times and times[0] <= now - self.window_s:
            times.popleft()
        times.append(now)
        if len(times) > self.max_connects:
            times.clear()
            return self.bans.ban("client_id", client_id, "flapping", now + self.ban_s)
        return None
