"""Token buckets, and a bounded table of them keyed by device.

A bucket holds up to ``burst`` tokens and gains ``rate`` per second. Taking
more than it holds is allowed once the balance is paid back: ``take`` always
debits and returns how long the caller must wait before its next take, so a
reading that arrived is never dropped here, only the next read delayed (what
MQTT backpressure needs), and a caller that must refuse instead (HTTP 429)
asks ``wait_for`` first and takes only when it is zero.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["TokenBucket", "BoundedTable"]


class TokenBucket:
    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0:
            raise ValueError("a bucket needs a positive rate")
        self.rate = rate
        self.burst = burst if burst > 0 else max(rate, 1.0)
        self.tokens = self.burst
        self.stamp = now

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def take(self, amount: float, now: float) -> float:
        """Debit ``amount`` (the balance may go negative); seconds until it is
        back to zero, 0.0 if it never went below."""
        self._refill(now)
        self.tokens -= amount
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate

    def wait_for(self, amount: float, now: float) -> float:
        """Seconds until ``amount`` may be taken: until the bucket holds it,
        or, for more than it ever holds, until it is full (the excess is then
        paid back by the waits of later takes)."""
        self._refill(now)
        amount = min(amount, self.burst)
        if amount <= self.tokens:
            return 0.0
        return (amount - self.tokens) / self.rate

    def reconfigure(self, rate: float, burst: float) -> None:
        """New limits (a SIGHUP reload) keep the balance, capped by the new burst."""
        self.rate = rate
        self.burst = burst if burst > 0 else max(rate, 1.0)
        self.tokens = min(self.tokens, self.burst)


K = TypeVar("K")
V = TypeVar("V")


class BoundedTable(Generic[K, V]):
    """A mapping that keeps at most ``limit`` entries, dropping the least
    recently used: a flood of new device ids or addresses costs a bounded
    amount of memory (a dropped bucket starts full again, which errs on the
    side of the device)."""

    __slots__ = ("limit", "_items", "_make")

    def __init__(self, limit: int, make: Callable[[K], V]) -> None:
        self.limit = limit
        self._items: OrderedDict[K, V] = OrderedDict()
        self._make = make

    def get(self, key: K) -> V:
        items = self._items
        value = items.get(key)
        if value is None:
            value = items[key] = self._make(key)
            if len(items) > self.limit:
                items.popitem(last=False)
        else:
            items.move_to_end(key)
        return value

    def peek(self, key: K) -> V | None:
        return self._items.get(key)

    def pop(self, key: K) -> V | None:
        return self._items.pop(key, None)

    def values(self) -> list[V]:
        return list(self._items.values())

    def __len__(self) -> int:
        return len(self._items)
