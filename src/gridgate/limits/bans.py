"""Bans with an expiry, by kind (``client_id`` for flapping, ``address`` for
repeated authentication failures), and the flapping detector that issues
the client-id ones.

Both tables are bounded: a flood of fresh client ids or addresses evicts the
least recently seen entries instead of growing memory.
"""
from __future__ import annotations

from collections import OrderedDict
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
        self.limit = limit
        # The connect times of each client id, least recently connected
        # first: one entry per idle device, so its size counts. A deque
        # (624 bytes even empty) cost 0.7 KiB per connection at 15k idle
        # devices; a lone time is kept as a bare float (24 bytes), more as
        # a tuple. Connects are rare enough to rebuild it each time.
        self._connects: OrderedDict[str, float | tuple[float, ...]] = OrderedDict()

    def connect(self, client_id: str, now: float) -> Ban | None:
        """Record a connect; the ban in force on this id, new or old, if any."""
        if self.ban_s <= 0:
            return None
        ban = self.bans.banned("client_id", client_id, now)
        if ban is not None:
            return ban
        connects = self._connects
        cutoff = now - self.window_s
        before = connects.pop(client_id, None)
        times: float | tuple[float, ...]
        if before is None:
            times = now
        else:
            kept = tuple(t for t in (before if isinstance(before, tuple) else (before,)) if t > cutoff) + (now,)
            if len(kept) > self.max_connects:
                return self.bans.ban("client_id", client_id, "flapping", now + self.ban_s)
            times = kept[0] if len(kept) == 1 else kept
        connects[client_id] = times
        if len(connects) > self.limit:
            connects.popitem(last=False)
        # Least recently connected first: drop ids whose last connect left
        # the window (they would start afresh anyway), two per connect (each
        # adds at most one), so a fleet that stays connected leaves no
        # entries here once a window has passed, without a scan.
        for _ in range(2):
            oldest_id = next(iter(connects), None)
            if oldest_id is None:
                break
            oldest = connects[oldest_id]
            if (oldest[-1] if isinstance(oldest, tuple) else oldest) > cutoff:
                break
            del connects[oldest_id]
        return None
